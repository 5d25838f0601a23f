"""Where bytes go: a thin layer over fsspec.

Only two things differ by backend, because fsspec cannot express them: local
files are made durable with fsync and committed with an atomic rename; object
stores are durable once a PUT returns and commit with a single PUT.

On S3 (ckpt/s3.py) large objects go up as parallel multipart uploads that are
aborted on failure, reads are ranged GETs streamed into the caller's buffers,
and listings are never served from a cache, so polling sees new objects.
Every call to a remote backend runs under a :class:`~ckpt.retry.RetryPolicy`
(``storage_options["retry"]``: a policy or a dict of its fields).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import BinaryIO, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from . import s3
from .errors import TruncatedObjectError
from .multipart import MultipartWriter
from .retry import RetryPolicy

T = TypeVar("T")

_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) (not in the os module), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


class Storage:
    """A checkpoint location: a directory or object-store prefix."""

    def __init__(self, uri: str, **storage_options) -> None:
        self.uri = uri
        opts = dict(storage_options)
        self.retry = RetryPolicy.of(opts.pop("retry", None))
        if "retry" in storage_options:
            storage_options = {**storage_options, "retry": asdict(self.retry)}
        self.options = storage_options  # kept (JSON-able) so another process (the daemon) can reopen it
        self.s3 = s3.is_s3(uri)
        if self.s3:
            opts = s3.s3_options(opts)
        self.fs, self.root = fsspec.core.url_to_fs(uri, **opts)
        if self.s3:
            s3.adopt(self.fs)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = self.root.rstrip("/")

    def _call(self, operation: str, rel: str, fn: Callable[[], T]) -> T:
        """``fn()`` under the retry policy (remote backends); errors name ``rel``."""
        if self.local:
            return fn()
        return self.retry.call(operation, self.describe(rel), fn)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def describe(self, rel: str) -> str:
        return f"{self.uri.rstrip('/')}/{rel}"

    @contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        """A file whose bytes are durable when the block exits without error."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb", buffering=0) as f:
                yield f
                os.fsync(f.fileno())
        elif self.s3:
            w = MultipartWriter(
                self.fs, path, self.describe(rel), self.fs.default_block_size, self.fs.max_concurrency, self.retry
            )
            try:
                yield w  # type: ignore[misc]
            except BaseException as e:
                w.abort(cause=e)
                raise
            w.close()
        else:
            with self.fs.open(path, "wb") as f:
                yield f

    def start_writeback(self, f: BinaryIO, start: int, stop: int) -> None:
        """Hint: start writing bytes [start, stop) of a local file from ``open_write`` to disk now.

        Without it the kernel holds a checkpoint's pages dirty until the final
        fsync, which then waits for all of them after the CPU work is done;
        started early, the disk works while the rest is still being produced.
        Durability still comes from the fsync. No-op where unsupported.
        """
        if not self.local or _sync_file_range is None or stop <= start:
            return
        try:
            fd = f.fileno()
        except (AttributeError, OSError, ValueError):
            return
        _sync_file_range(fd, start, stop - start, _SYNC_FILE_RANGE_WRITE)

    def put_atomic(self, rel: str, data: bytes) -> None:
        """Make ``data`` appear at ``rel`` all at once, or not at all."""
        path = self.path(rel)
        if self.local:
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif self.s3:
            bucket, key, _ = self.fs.split_path(path)
            self._call("PutObject", rel, lambda: self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data))
            self.fs.invalidate_cache(path)
        else:
            self._call("put", rel, lambda: self.fs.pipe_file(path, data))

    def read_bytes(self, rel: str) -> bytes:
        return self._call("GetObject", rel, lambda: self.fs.cat_file(self.path(rel)))

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        return self._call(
            f"GetObject bytes [{start}, {stop})", rel, lambda: self.fs.cat_file(self.path(rel), start=start, end=stop)
        )

    def read_into_many(self, rel: str, start: int, bufs: list[memoryview]) -> None:
        """Fill ``bufs`` in order with the object's bytes from ``start`` (a scatter read).

        Local files are read straight into the buffers (no intermediate copy);
        other backends fetch the range with one request and copy it out.
        """
        n = sum(len(b) for b in bufs)
        if self.local:
            got = 0
            fd = os.open(self.path(rel), os.O_RDONLY)
            try:
                pending = [b for b in bufs if len(b)]
                while pending:
                    k = os.preadv(fd, pending[:1024], start + got)  # IOV_MAX
                    if k == 0:
                        break
                    got += k
                    while pending and k >= len(pending[0]):
                        k -= len(pending[0])
                        pending.pop(0)
                    if pending and k:
                        pending[0] = pending[0][k:]
            finally:
                os.close(fd)
        elif self.s3:
            got = self._call(
                f"GetObject bytes [{start}, {start + n})",
                rel,
                lambda: s3.read_into(self.fs, self.path(rel), start, bufs),
            )
        else:
            data = memoryview(self.read_range(rel, start, start + n))
            got, at = len(data), 0
            for b in bufs:
                take = min(len(b), max(0, got - at))
                b[:take] = data[at : at + take]
                at += len(b)
        if got < n:
            raise TruncatedObjectError(
                f"{self.describe(rel)}: bytes [{start}, {start + n}) requested, object ends at {start + got}"
            )

    def map_range(self, rel: str, start: int, stop: int) -> memoryview | None:
        """Bytes [start, stop) of a local object, mapped from the page cache (no read copy).

        A private (copy-on-write) mapping: readers may view it as a writable
        tensor without touching the file. None on other backends. Objects are
        immutable once written; a short file raises TruncatedObjectError here, never SIGBUS later.
        """
        if not self.local:
            return None
        fd = os.open(self.path(rel), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if stop > size:
                raise TruncatedObjectError(
                    f"{self.describe(rel)}: bytes [{start}, {stop}) requested, object ends at {size}"
                )
            if stop <= start:
                return memoryview(bytearray(0))
            base = start - start % mmap.ALLOCATIONGRANULARITY
            m = mmap.mmap(fd, stop - base, access=mmap.ACCESS_COPY, offset=base)
        finally:
            os.close(fd)
        return memoryview(m)[start - base :]

    def exists(self, rel: str) -> bool:
        path = self.path(rel)
        if self.s3:
            if rel:  # an object: one uncached HEAD (polling loops call this often)
                return self._call("HeadObject", rel, lambda: s3.object_exists(self.fs, path))
            self.fs.invalidate_cache(path)  # the prefix itself: a fresh listing
        return self._call("exists", rel, lambda: self.fs.exists(path))

    def size(self, rel: str) -> int:
        if self.s3:
            return int(self._call("HeadObject", rel, lambda: self.fs.info(self.path(rel), refresh=True))["size"])
        return int(self._call("size", rel, lambda: self.fs.size(self.path(rel))))

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        extra = {"refresh": True} if self.s3 else {}
        try:
            entries = self._call("list", rel, lambda: self.fs.ls(self.path(rel), detail=False, **extra))
        except FileNotFoundError:
            return []
        me = self.fs._strip_protocol(self.path(rel)).rstrip("/")
        # an empty "directory" (a key ending in "/") lists as itself on object stores: not a child
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != me)

    def delete(self, rel: str, recursive: bool = False) -> None:
        try:
            self._call("delete", rel, lambda: self.fs.rm(self.path(rel), recursive=recursive))
        except FileNotFoundError:
            pass

    def open_uploads(self) -> list[tuple[str, str, float | None]]:
        """Unfinished multipart uploads under this location: (path relative to it, upload id,
        start time). Only object stores have them; a killed writer leaves them behind."""
        if not self.s3:
            return []
        return self._call("ListMultipartUploads", "", lambda: s3.open_uploads(self.fs, self.root))

    def abort_upload(self, rel: str, upload_id: str) -> None:
        if self.s3:
            self._call("AbortMultipartUpload", rel, lambda: s3.abort_upload(self.fs, self.path(rel), upload_id))

    def invalidate(self) -> None:
        """Forget cached listings (object stores) so polling sees new objects."""
        if self.s3:
            self.fs.invalidate_cache(self.root)  # only this prefix: the s3fs instance is shared
        else:
            self.fs.invalidate_cache()
