"""What ckpt adds on top of s3fs for ``s3://`` locations.

Configuration stays what s3fs and botocore read: credentials, region and
endpoint from ``storage_options`` (``key``, ``secret``, ``endpoint_url``,
``client_kwargs``, ``config_kwargs``) or the standard AWS mechanisms
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``~/.aws/config``, ...). Two s3fs
options size uploads: ``default_block_size`` is the multipart part size and
``max_concurrency`` the parts in flight per object; ckpt only changes their
defaults to the ones measured below.

Retries belong to one layer, :class:`ckpt.retry.RetryPolicy`, so the total
time of an operation is bounded: botocore's own retries are turned off unless
the caller configured them (``config_kwargs["retries"]`` or ``AWS_MAX_ATTEMPTS``),
and s3fs's retry loop is set to a single attempt on the instances ckpt opens.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec.asyn

# Measured against SeaweedFS on loopback (bench/bench_s3.py --sweep, 1 GiB on 2 ranks): on
# this 2-core machine the server's CPU is the bottleneck (15-18 CPU s per GiB, mostly MD5).
# Parts of 16-64 MiB made no difference; 1 part in flight per object was ~1 s (10%) faster
# than 4, the server spending that much less CPU on contention. 32 MiB x 4 stays the
# default: it bounds buffers at 160 MiB per open object and gives a remote store (where
# one connection carries ~50-100 MB/s) four streams per object.
DEFAULT_PART_BYTES = 32 << 20
DEFAULT_UPLOAD_CONCURRENCY = 4
READ_PIECE_BYTES = 4 << 20  # a response is copied into the caller's buffers this much at a time


def is_s3(uri: str) -> bool:
    return fsspec.core.split_protocol(uri)[0] in ("s3", "s3a")


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
