"""MultipartWriter against an in-memory fake of the S3 calls: part numbering and order
under concurrency, single PUT for small objects, retries, abort on failure."""

from __future__ import annotations

import random
import threading
import time

import pytest
from botocore.exceptions import ClientError

import ckpt.storage.multipart as mp
from ckpt.storage.multipart import MultipartWriter
from ckpt.storage.retry import RetryPolicy

FAST = RetryPolicy(max_attempts=4, base_delay_s=0.001, max_delay_s=0.002, deadline_s=10.0)


class FakeS3:
    """Just the S3 calls MultipartWriter makes, with random latency per part."""

    def __init__(self, seed: int = 0, fail_part: int | None = None, flaky_part: int | None = None) -> None:
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.objects: dict[str, bytes] = {}
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.calls: list[tuple[str, int | None]] = []
        self.fail_part, self.flaky_part = fail_part, flaky_part

    def split_path(self, path: str):
        bucket, key = path.split("/", 1)
        return bucket, key, None

    def invalidate_cache(self, path=None) -> None:
        pass

    def info(self, path: str, refresh: bool = False) -> dict:
        return {"size": len(self.objects[path.split("/", 1)[1]])}

    def call_s3(self, method: str, **kw):
        with self.lock:
            self.calls.append((method, kw.get("PartNumber")))
            delay = self.rng.uniform(0, 0.004)
        if method == "create_multipart_upload":
            with self.lock:
                uid = f"u{len(self.uploads)}"
                self.uploads[uid] = {}
            return {"UploadId": uid}
        if method == "upload_part":
            n = kw["PartNumber"]
            time.sleep(delay)
            if n == self.fail_part:
                raise PermissionError("Access Denied")
            if n == self.flaky_part and sum(1 for c in self.calls if c == ("upload_part", n)) == 1:
                raise ClientError({"Error": {"Code": "SlowDown"}}, "UploadPart")
            body = _consume(kw["Body"])
            with self.lock:
                self.uploads[kw["UploadId"]][n] = body
            return {"ETag": f'"{n}"'}
        if method == "complete_multipart_upload":
            parts = self.uploads.pop(kw["UploadId"])
            listed = [p["PartNumber"] for p in kw["MultipartUpload"]["Parts"]]
            assert listed == sorted(parts) == list(range(1, len(parts) + 1))
            self.objects[kw["Key"]] = b"".join(parts[n] for n in listed)
            return {}
        if method == "abort_multipart_upload":
            self.uploads.pop(kw["UploadId"])
            return {}
        if method == "put_object":
            self.objects[kw["Key"]] = _consume(kw["Body"])
            return {}
        raise AssertionError(method)


def _consume(body) -> bytes:
    """Read a request body as botocore and aiohttp do: its length, a checksum pass in
    pieces, a seek back to where it started, then the send pass."""
    size, start = len(body), body.tell()
    first = b"".join(bytes(c) for c in iter(lambda: body.read(333), b""))
    body.seek(start)
    sent = b"".join(bytes(c) for c in iter(lambda: body.read(1 << 20), b""))
    assert first == sent and len(sent) == size
    return sent


@pytest.fixture(autouse=True)
def small_parts(monkeypatch):
    monkeypatch.setattr(mp, "MIN_PART_BYTES", 1024)


def _write(fs: FakeS3, data: bytes, part: int, conc: int, seed: int = 0) -> MultipartWriter:
    w = MultipartWriter(fs, "b/k", "s3://b/k", part, conc, FAST)
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        n = rng.randrange(1, 3 * part)
        assert w.write(memoryview(data)[at : at + n]) == len(data[at : at + n])
        at += n
    w.close()
    return w


@pytest.mark.parametrize("seed", range(4))
def test_concurrent_parts_are_numbered_once_and_assembled_in_order(seed):
    data = random.Random(seed).randbytes(1024 * 97 + 13)
    fs = FakeS3(seed)
    _write(fs, data, 1024, 4, seed)
    assert fs.objects["k"] == data
    numbers = [n for m, n in fs.calls if m == "upload_part"]
    assert sorted(numbers) == list(range(1, 99))
    assert fs.uploads == {}


def test_small_object_is_one_put():
    fs = FakeS3()
    _write(fs, b"x" * 1000, 1024, 4)
    assert fs.objects["k"] == b"x" * 1000
    assert [m for m, _ in fs.calls] == ["put_object"]


def test_transient_part_failure_is_retried():
    data = random.Random(1).randbytes(1024 * 10)
    fs = FakeS3(flaky_part=3)
    _write(fs, data, 1024, 3)
    assert fs.objects["k"] == data
    assert [n for m, n in fs.calls if m == "upload_part"].count(3) == 2


def test_failed_part_aborts_and_publishes_nothing():
    data = random.Random(2).randbytes(1024 * 10)
    fs = FakeS3(fail_part=4)
    with pytest.raises(PermissionError):
        _write(fs, data, 1024, 2)
    assert "k" not in fs.objects and fs.uploads == {}
    assert ("abort_multipart_upload", None) in fs.calls


def test_abort_discards_uploaded_parts():
    fs = FakeS3()
    w = MultipartWriter(fs, "b/k", "s3://b/k", 1024, 2, FAST)
    w.write(b"y" * 5000)
    w.abort(cause=RuntimeError("producer died"))
    assert fs.uploads == {} and "k" not in fs.objects
    with pytest.raises(ValueError, match="write after close"):
        w.write(b"z")


def test_part_size_grows_so_any_object_fits(monkeypatch):
    monkeypatch.setattr(mp, "GROW_EVERY", 3)
    data = random.Random(3).randbytes(1024 * 3 + 2048 * 3 + 4096)
    fs = FakeS3()
    _write(fs, data, 1024, 2)
    assert fs.objects["k"] == data
    assert len([1 for m, _ in fs.calls if m == "upload_part"]) == 7  # 3 x 1 KiB, 3 x 2 KiB, 1 x 4 KiB


def test_part_size_below_the_s3_minimum_is_refused(monkeypatch):
    monkeypatch.setattr(mp, "MIN_PART_BYTES", 5 << 20)
    with pytest.raises(ValueError, match="minimum"):
        MultipartWriter(FakeS3(), "b/k", "s3://b/k", 1 << 20, 2, FAST)
