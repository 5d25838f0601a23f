"""The S3 backend: ``s3://`` locations through s3fs, with what ckpt adds on top of it.

Durable means a PUT returned: an atomic put is one PutObject, a large write a
parallel multipart upload (``multipart.py``) aborted on failure; reads are
ranged GETs streamed into the caller's buffers; ``exists`` is one uncached
HEAD and listings are never served from a cache, so polling sees new objects.
A conditional put is a PutObject with ``If-None-Match: *``.

Configuration stays what s3fs and botocore read: credentials, region and
endpoint from ``storage_options`` (``key``, ``secret``, ``endpoint_url``,
``client_kwargs``, ``config_kwargs``) or the standard AWS mechanisms
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``~/.aws/config``, ...). Two s3fs
options size uploads: ``default_block_size`` is the multipart part size and
``max_concurrency`` the parts in flight per object; ckpt only changes their
defaults to the ones measured below.

Retries belong to one layer, :class:`ckpt.storage.retry.RetryPolicy`, so the total
time of an operation is bounded: botocore's own retries are turned off unless
the caller configured them (``config_kwargs["retries"]`` or ``AWS_MAX_ATTEMPTS``),
and s3fs's retry loop is set to a single attempt on the instances ckpt opens.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import fsspec.asyn

from .base import ConditionalPutUnsupportedError, is_s3
from .generic import FsspecStorage
from .multipart import MultipartWriter
from .retry import error_code

# Measured against SeaweedFS on loopback (bench/bench_s3.py --sweep, 1 GiB on 2 ranks): on
# this 2-core machine the server's CPU is the bottleneck (15-18 CPU s per GiB, mostly MD5).
# Parts of 16-64 MiB made no difference; 1 part in flight per object was ~1 s (10%) faster
# than 4, the server spending that much less CPU on contention. 32 MiB x 4 stays the
# default: it bounds buffers at 160 MiB per open object and gives a remote store (where
# one connection carries ~50-100 MB/s) four streams per object.
DEFAULT_PART_BYTES = 32 << 20
DEFAULT_UPLOAD_CONCURRENCY = 4
READ_PIECE_BYTES = 4 << 20  # a response is copied into the caller's buffers this much at a time


def s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ckpt's defaults filled in where the caller set nothing."""
    opts = dict(options)
    opts.setdefault("default_block_size", DEFAULT_PART_BYTES)
    opts.setdefault("max_concurrency", DEFAULT_UPLOAD_CONCURRENCY)
    config = dict(opts.get("config_kwargs") or {})
    if "retries" not in config and not os.environ.get("AWS_MAX_ATTEMPTS"):
        config["retries"] = {"total_max_attempts": 1}
    # parts of a few objects in flight plus the load's parallel reads, without queueing for a connection
    config.setdefault("max_pool_connections", max(10, 2 * int(opts["max_concurrency"]) + 8))
    opts["config_kwargs"] = config
    return opts


class S3Storage(FsspecStorage):
    """A bucket prefix on S3 or an S3-compatible server."""

    def __init__(self, uri: str, **storage_options: Any) -> None:
        if not is_s3(uri):
            raise ValueError(f"{uri}: not an s3:// location (open it with ckpt.storage.open_storage)")
        super().__init__(uri, **storage_options)
        adopt(self.fs)

    def _fs_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return s3_options(options)

    @contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        """A single PUT when small, else a parallel multipart upload, aborted if the block fails."""
        w = MultipartWriter(
            self.fs, self.path(rel), self.uri_of(rel), self.fs.default_block_size, self.fs.max_concurrency, self.retry
        )
        try:
            yield w  # type: ignore[misc]
        except BaseException as e:
            w.abort(cause=e)
            raise
        w.close()

    def put_atomic(self, rel: str, data: bytes) -> None:
        """One PutObject: S3 shows an object whole once the PUT returns."""
        path = self.path(rel)
        bucket, key, _ = self.fs.split_path(path)
        self._call("PutObject", rel, lambda: self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data))
        self.fs.invalidate_cache(path)

    @property
    def supports_put_if_absent(self) -> bool:
        return True

    def put_if_absent(self, rel: str, data: bytes) -> bool:
        """One PutObject with ``If-None-Match: *``: the server refuses it (412) if the key exists.

        AWS S3, MinIO and SeaweedFS (4.x, the tests' server) honour the header; a server that
        answers 501 raises ConditionalPutUnsupportedError. A server that ignores it overwrites
        silently, which no client can detect. A 412 may answer our own earlier attempt whose
        reply was lost (retried here, or resent by aiohttp on a dropped keep-alive connection),
        so on a 412 the object counts as ours when it holds exactly ``data``: callers that must
        tell writers apart put bytes that name the writer.
        """
        path = self.path(rel)
        bucket, key, _ = self.fs.split_path(path)

        def put() -> bool:
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except OSError as e:
                code = error_code(e)
                if code in ("PreconditionFailed", "412"):
                    return False
                if code in ("NotImplemented", "501"):
                    raise ConditionalPutUnsupportedError(
                        f"{self.uri_of(rel)}: the server does not support conditional PUT (If-None-Match): {code}"
                    ) from e
                raise
            return True

        created = self._call("PutObject If-None-Match", rel, put)
        self.fs.invalidate_cache(path)
        if created:
            return True
        try:
            return self.read_bytes(rel) == data
        except FileNotFoundError:  # deleted since: whoever created it, it was not this call's
            return False

    def read_into_many(self, rel: str, start: int, bufs: list[memoryview]) -> None:
        """One ranged GET streamed into ``bufs``."""
        n = sum(len(b) for b in bufs)
        got = self._call(
            f"GetObject bytes [{start}, {start + n})", rel, lambda: read_into(self.fs, self.path(rel), start, bufs)
        )
        self._check_length(rel, start, n, got)

    def exists(self, rel: str) -> bool:
        path = self.path(rel)
        if rel:  # an object: one uncached HEAD (polling loops call this often)
            return self._call("HeadObject", rel, lambda: object_exists(self.fs, path))
        self.fs.invalidate_cache(path)  # the prefix itself: a fresh listing
        return self._call("exists", rel, lambda: self.fs.exists(path))

    def size(self, rel: str) -> int:
        return int(self._call("HeadObject", rel, lambda: self.fs.info(self.path(rel), refresh=True))["size"])

    def _ls(self, path: str) -> list[str]:
        return self.fs.ls(path, detail=False, refresh=True)

    def remove_empty_dir(self, rel: str) -> None:
        """DeleteObject of ``rel/``: on AWS a prefix vanishes with its last object and this removes
        at most a zero-byte directory marker; servers with real directories (SeaweedFS) drop the
        directory entry if it is empty, and leave the objects under it if it is not."""
        bucket, key, _ = self.fs.split_path(self.path(rel))
        self._call("DeleteObject", rel, lambda: self.fs.call_s3("delete_object", Bucket=bucket, Key=f"{key}/"))
        self.fs.invalidate_cache(self.path(rel))

    def invalidate(self) -> None:
        self.fs.invalidate_cache(self.root)  # only this prefix: the s3fs instance is shared

    def open_uploads(self) -> list[tuple[str, str, float | None]]:
        return self._call("ListMultipartUploads", "", lambda: open_uploads(self.fs, self.root))

    def abort_upload(self, rel: str, upload_id: str) -> None:
        self._call("AbortMultipartUpload", rel, lambda: abort_upload(self.fs, self.path(rel), upload_id))


def adopt(fs: Any) -> None:
    """Hand retries of an s3fs instance opened by ckpt over to ckpt's policy."""
    fs.retries = 1


def object_exists(fs: Any, path: str) -> bool:
    """Whether an object is at ``path``: one HEAD, never a cached listing."""
    bucket, key, _ = fs.split_path(path)
    try:
        fs.call_s3("head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return False
    return True


def open_uploads(fs: Any, root: str) -> list[tuple[str, str, float | None]]:
    """Multipart uploads in progress under ``root`` ("bucket/prefix"): (key relative to
    ``root``, upload id, when it started), every page of the listing."""
    bucket, key, _ = fs.split_path(root)
    prefix = f"{key.rstrip('/')}/" if key else ""
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    found = []
    while True:
        page = fs.call_s3("list_multipart_uploads", **request)
        for u in page.get("Uploads", []):
            started = u.get("Initiated")
            found.append((u["Key"][len(prefix) :], u["UploadId"], started.timestamp() if started else None))
        if not page.get("IsTruncated"):
            return found
        request.update(KeyMarker=page.get("NextKeyMarker", ""), UploadIdMarker=page.get("NextUploadIdMarker", ""))


def abort_upload(fs: Any, path: str, upload_id: str) -> None:
    """Discard a multipart upload and the parts it holds (gone already is fine)."""
    bucket, key, _ = fs.split_path(path)
    try:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
    except FileNotFoundError:
        pass


def read_into(fs: Any, path: str, start: int, bufs: list[memoryview]) -> int:
    """One ranged GET of bytes [start, start + sum(len(bufs))) streamed into ``bufs``
    in order; returns how many bytes arrived (fewer only if the object ends first).

    The body is copied once, from the socket's chunks into the caller's
    buffers: no whole-range bytes object is ever assembled.
    """
    n = sum(len(b) for b in bufs)
    if n == 0:
        return 0
    return fsspec.asyn.sync(fs.loop, _read_into, fs, path, start, n, bufs)


async def _read_into(fs: Any, path: str, start: int, n: int, bufs: list[memoryview]) -> int:
    from botocore.exceptions import ClientError

    bucket, key, version = fs.split_path(path)
    extra = {"VersionId": version} if version else {}
    try:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{start + n - 1}", **extra)
    except (ClientError, OSError) as e:
        if _is_invalid_range(e):
            return 0  # the object ends before ``start``
        raise
    body = resp["Body"]
    try:
        status = resp["ResponseMetadata"]["HTTPStatusCode"]
        if status != 206 and start != 0:
            raise OSError(f"{path}: server ignored Range bytes={start}-{start + n - 1} (HTTP {status})")
        got = 0
        for b in bufs:
            at = 0
            while at < len(b):
                piece = await body.read(min(len(b) - at, READ_PIECE_BYTES))
                if not piece:
                    return got
                b[at : at + len(piece)] = piece
                at += len(piece)
                got += len(piece)
        return got
    finally:
        body.close()


def _is_invalid_range(e: BaseException) -> bool:
    cur: BaseException | None = e
    while cur is not None:
        response = getattr(cur, "response", None)
        if isinstance(response, dict) and (response.get("Error") or {}).get("Code") == "InvalidRange":
            return True
        cur = cur.__cause__
    return False
