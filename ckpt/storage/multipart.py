"""Writing one S3 object: a single PUT when small, a parallel multipart upload when large.

s3fs's own file writer uploads parts one after another and, leaving a ``with``
block on an exception, completes the upload with whatever it had, so a failed
write would still publish a truncated object. This writer keeps up to
``concurrency`` parts in flight while the producer fills the next one, retries
each request under the storage's :class:`RetryPolicy`, and on any failure
aborts the multipart upload so no parts are left behind (billed, invisible).

Memory: at most ``concurrency + 1`` part buffers per open object.

Each request body is a :class:`PartBody`, a stream of views into the part's
buffer. Handed a bytes-like body, aiohttp writes it to asyncio's transport in
one call, and on Python < 3.12 the transport copies whatever the socket did not
take at once (nearly all of a large part) into its own buffer, in fresh memory.
A stream goes out in 256 KiB pieces that the socket mostly takes whole: 256 MiB
uploaded to SeaweedFS on loopback cost the client 1.0 s of CPU instead of 1.2 s.
"""

from __future__ import annotations

import io
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from .retry import RetryPolicy, StorageOperationError

MIN_PART_BYTES = 5 << 20  # S3's floor for every part but the last
MAX_PARTS = 10_000  # S3's ceiling on parts per upload
GROW_EVERY = 2_000  # parts; the part size doubles after each such run, so objects of any size fit


class MultipartWriter:
    """A write-only binary file over one S3 object; nothing is visible until :meth:`close`."""

    def __init__(
        self,
        fs: Any,
        path: str,
        target: str,
        part_bytes: int,
        concurrency: int,
        retry: RetryPolicy,
    ) -> None:
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part size {part_bytes} is below S3's minimum of {MIN_PART_BYTES} bytes")
        if concurrency < 1:
            raise ValueError("upload concurrency must be >= 1")
        self.fs, self.path, self.target = fs, path, target
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_bytes, self.concurrency, self.retry = part_bytes, concurrency, retry
        self.upload_id: str | None = None
        self.parts: dict[int, dict[str, Any]] = {}  # filled by the upload threads as parts land
        self._sent = 0  # parts handed to the upload threads (numbered 1..sent)
        self.size = 0
        self._buf = bytearray(self._part_size(1))
        self._fill = 0
        self._free: list[bytearray] = []
        self._inflight: dict[Future, int] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    # -- the file interface ObjectWriter uses -------------------------------------------------

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        """Copy ``data`` into the current part (the caller may reuse its buffer at once)."""
        if self._closed:
            raise ValueError(f"{self.target}: write after close")
        mv = memoryview(data).cast("B")
        n = len(mv)
        while len(mv):
            room = len(self._buf) - self._fill
            take = min(room, len(mv))
            self._buf[self._fill : self._fill + take] = mv[:take]
            self._fill += take
            mv = mv[take:]
            if self._fill == len(self._buf):
                try:
                    self._send_part()
                except BaseException as e:  # a part failed for good: the upload is dead
                    self.abort(cause=e)
                    raise
        self.size += n
        return n

    def close(self) -> None:
        """Publish the object: one PUT, or the last part and the multipart completion."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.upload_id is None:
                body = memoryview(self._buf)[: self._fill]
                self.retry.call(
                    "PutObject",
                    self.target,
                    lambda: self._s3("put_object", Bucket=self.bucket, Key=self.key, Body=PartBody(body)),
                )
            else:
                if self._fill:
                    self._send_part()
                self._drain(0)
                self._complete()
        except BaseException as e:
            self._abort_after(e)
            raise
        finally:
            self._shutdown()
        self.fs.invalidate_cache(self.path)

    def abort(self, cause: BaseException | None = None) -> None:
        """Give up: nothing is published and uploaded parts are discarded.

        With ``cause`` (the error that made the caller give up), a failure to
        abort is noted on ``cause`` instead of replacing it.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if cause is None:
                self._abort()
            else:
                self._abort_after(cause)
        finally:
            self._shutdown()

    def _abort_after(self, cause: BaseException) -> None:
        try:
            self._abort()
        except Exception as e:
            if hasattr(cause, "add_note"):
                cause.add_note(f"{self.target}: the multipart upload could not be aborted either: {e}")

    # -- internals ---------------------------------------------------------------------------

    def _part_size(self, number: int) -> int:
        return self.part_bytes << ((number - 1) // GROW_EVERY)

    def _s3(self, method: str, **kwargs) -> dict[str, Any]:
        return self.fs.call_s3(method, **kwargs)

    def _send_part(self) -> None:
        if self.upload_id is None:
            self.upload_id = self.retry.call(
                "CreateMultipartUpload",
                self.target,
                lambda: self._s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)["UploadId"],
            )
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="ckpt-upload")
        number = self._sent + 1
        if number > MAX_PARTS:
            raise StorageOperationError(f"{self.target}: more than {MAX_PARTS} parts", "UploadPart", self.target, 0)
        self._drain(self.concurrency - 1)
        buf, fill = self._buf, self._fill
        assert self._pool is not None
        self._inflight[self._pool.submit(self._upload_part, number, buf, fill)] = number
        self._sent = number
        size = self._part_size(number + 1)
        self._buf = self._free.pop() if self._free and len(self._free[-1]) == size else bytearray(size)
        self._fill = 0

    def _upload_part(self, number: int, buf: bytearray, fill: int) -> bytearray:
        body = memoryview(buf)[:fill]
        out = self.retry.call(
            f"UploadPart {number}",
            self.target,
            lambda: self._s3(
                "upload_part",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=PartBody(body),
            ),
        )
        part = {"PartNumber": number, "ETag": out["ETag"]}
        part.update({k: v for k, v in out.items() if k.startswith("Checksum") and k != "ChecksumType"})
        self.parts[number] = part
        return buf

    def _drain(self, most: int) -> None:
        """Wait until at most ``most`` parts are in flight; raise the first failure."""
        while len(self._inflight) > most:
            done, _ = wait(self._inflight, return_when=FIRST_COMPLETED)
            for f in done:
                del self._inflight[f]
                buf = f.result()  # raises the part's error
                if len(self._free) < self.concurrency:
                    self._free.append(buf)

    def _complete(self) -> None:
        if sorted(self.parts) != list(range(1, self._sent + 1)):
            raise StorageOperationError(
                f"{self.target}: parts {sorted(self.parts)} landed, 1..{self._sent} were sent",
                "CompleteMultipartUpload",
                self.target,
                0,
            )
        parts = [self.parts[n] for n in range(1, self._sent + 1)]
        tries = [0]

        def complete() -> dict[str, Any]:
            tries[0] += 1
            try:
                return self._s3(
                    "complete_multipart_upload",
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except FileNotFoundError:
                # NoSuchUpload on a retry: the first attempt completed but its answer was lost.
                if tries[0] > 1 and self._published():
                    return {}
                raise

        self.retry.call("CompleteMultipartUpload", self.target, complete)
        self.upload_id = None

    def _published(self) -> bool:
        try:
            return int(self.fs.info(self.path, refresh=True)["size"]) == self.size
        except FileNotFoundError:
            return False

    def _abort(self) -> None:
        for f in self._inflight:
            f.cancel()
        if self._inflight:
            wait(self._inflight)  # a part still uploading would otherwise outlive the abort
        self._inflight.clear()
        if self.upload_id is None:
            return
        upload_id, self.upload_id = self.upload_id, None
        try:
            self.retry.call(
                "AbortMultipartUpload",
                self.target,
                lambda: self._s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload_id),
            )
        except FileNotFoundError:
            pass  # already gone

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._buf = bytearray()
        self._free.clear()


class PartBody(io.RawIOBase):
    """A request body read as views into a buffer: botocore checksums and signs it
    piece by piece (seeking back after each pass) and aiohttp sends it likewise.
    A fresh one per attempt, so a retry starts from the first byte."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._data, self._pos = data, 0

    def __len__(self) -> int:  # botocore's Content-Length
        return len(self._data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = min(max(0, base + offset), len(self._data))
        return self._pos

    def read(self, size: int | None = -1) -> memoryview | bytes:
        end = len(self._data) if size is None or size < 0 else min(len(self._data), self._pos + size)
        if end <= self._pos:
            return b""
        view, self._pos = self._data[self._pos : end], end
        return view

    def readinto(self, b) -> int:
        view = self.read(len(b))
        b[: len(view)] = view
        return len(view)
