"""Faults between client and S3 server (tests/faultproxy.py in front of SeaweedFS).

A save either succeeds through retries or fails cleanly within its retry
budget, naming the object and operation; no partial checkpoint ever becomes
visible; a load never hands back bytes that differ from what was saved.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from faultproxy import Fault, FaultProxy

import ckpt
from ckpt.format import MANIFEST
from ckpt.storage import ConditionalPutUnsupportedError, open_storage
from ckpt.storage.retry import StorageOperationError

pytestmark = [pytest.mark.s3, pytest.mark.faults]

MiB = 1 << 20
RETRY = {"max_attempts": 8, "base_delay_s": 0.02, "max_delay_s": 0.2, "deadline_s": 20.0}


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint_url) as p:
        yield p


def _opts(server, proxy: FaultProxy, **extra) -> dict:
    """Through the proxy, 5 MiB parts, short timeouts and a fast retry policy."""
    return server.storage_options(
        endpoint_url=proxy.endpoint_url,
        default_block_size=5 * MiB,
        max_concurrency=2,
        config_kwargs={"read_timeout": 3, "connect_timeout": 3},
        retry=extra.pop("retry", RETRY),
        **extra,
    )


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"big": torch.randn(3 * MiB, generator=g), "small": torch.randn(100, generator=g), "step": seed}


def _load(uri: str, opts: dict) -> dict:
    got = {"big": torch.zeros(3 * MiB), "small": torch.zeros(100), "step": -1}
    ckpt.load(got, uri, options=ckpt.LoadOptions(storage_options=opts))
    return got


def _same(a: dict, b: dict) -> bool:
    return torch.equal(a["big"], b["big"]) and torch.equal(a["small"], b["small"]) and a["step"] == b["step"]


def test_throttling_and_server_errors_are_retried(s3_server, s3_bucket, proxy):
    uri = f"s3://{s3_bucket}/throttled/step-1"
    opts = _opts(s3_server, proxy)
    proxy.add(Fault("status", 503), op="CreateMultipartUpload")
    proxy.add(Fault("status", 503), op="UploadPart", times=2)
    proxy.add(Fault("status", 500), op="UploadPart")
    proxy.add(Fault("status", 500), op="CompleteMultipartUpload")
    proxy.add(Fault("status", 503), op="PutObject", path=MANIFEST, times=2)
    sd = _state(1)
    ckpt.save(sd, uri, options=ckpt.SaveOptions(storage_options=opts))
    injected = [e for e in proxy.log if e.fault == "status"]
    assert len(injected) == 7 and {e.status for e in injected} == {500, 503}
    parts = {e.query.rsplit("partNumber=", 1)[1] for e in proxy.entries(op="UploadPart") if e.status == 200}
    assert parts == {"1", "2", "3"}  # 12 MiB in 5 MiB parts (a slow answer may have been retried too)

    proxy.add(Fault("status", 503), op="GetObject", times=3)
    assert _same(_load(uri, opts), sd)
    assert s3_server.open_uploads(s3_bucket) == []


def test_dropped_connections_are_retried(s3_server, s3_bucket, proxy):
    uri = f"s3://{s3_bucket}/dropped/step-1"
    opts = _opts(s3_server, proxy)
    proxy.add(Fault("reset"), op="UploadPart")
    proxy.add(Fault("reset_after"), op="UploadPart")  # the server has the part; the client never hears
    proxy.add(Fault("reset_after"), op="PutObject", path=MANIFEST)  # the commit landed; the answer did not
    sd = _state(2)
    ckpt.save(sd, uri, options=ckpt.SaveOptions(storage_options=opts))
    assert [e.fault for e in proxy.log if e.fault] == ["reset", "reset_after", "reset_after"]

    proxy.add(Fault("reset"), op="GetObject")
    proxy.add(Fault("truncate"), op="GetObject", path="/data/")
    assert _same(_load(uri, opts), sd)
    assert [e.fault for e in proxy.log if e.fault].count("truncate") == 1


def test_stalled_responses_time_out_and_are_retried(s3_server, s3_bucket, proxy):
    uri = f"s3://{s3_bucket}/stalled/step-1"
    opts = _opts(s3_server, proxy)
    sd = _state(3)
    proxy.add(Fault("stall", seconds=30), op="UploadPart")
    ckpt.save(sd, uri, options=ckpt.SaveOptions(storage_options=opts))
    proxy.add(Fault("stall", seconds=30), op="GetObject", path="/data/")
    start = time.monotonic()
    assert _same(_load(uri, opts), sd)
    assert time.monotonic() - start < 20  # a read timeout (3 s) and a retry, not the 30 s stall
    assert [e.fault for e in proxy.log].count("stall") == 2


def test_corrupted_bytes_are_never_returned(s3_server, s3_bucket, proxy):
    uri = f"s3://{s3_bucket}/corrupt/step-1"
    opts = _opts(s3_server, proxy)
    ckpt.save(_state(4), uri, options=ckpt.SaveOptions(storage_options=opts))
    proxy.add(Fault("corrupt"), op="GetObject", path="/data/")
    with pytest.raises(ckpt.CorruptChunkError, match=r"data/.*\.safetensors: bytes \[\d+, \d+\) of big"):
        _load(uri, opts)


def test_persistent_throttling_fails_cleanly_within_the_budget(s3_server, s3_bucket, proxy):
    uri = f"s3://{s3_bucket}/hopeless/step-1"
    budget = {"max_attempts": 100, "base_delay_s": 0.05, "max_delay_s": 0.5, "deadline_s": 3.0}
    opts = _opts(s3_server, proxy, retry=budget)
    proxy.add(Fault("status", 503), op="UploadPart", times=-1)
    watcher = open_storage(uri, **s3_server.storage_options())
    seen_manifest = []
    done = threading.Event()

    def poll() -> None:  # a reader polling for the checkpoint while the save struggles
        while not done.is_set():
            seen_manifest.append(watcher.exists(MANIFEST))
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    start = time.monotonic()
    try:
        with pytest.raises(StorageOperationError) as info:
            ckpt.save(_state(5), uri, options=ckpt.SaveOptions(storage_options=opts))
    finally:
        done.set()
        poller.join()
    elapsed = time.monotonic() - start
    msg = str(info.value)
    assert "UploadPart" in msg and "SlowDown" in msg and f"{uri}/data/" in msg and ".safetensors" in msg
    assert elapsed < 3.0 + 5.0  # the deadline plus the requests in flight when it passed
    assert seen_manifest and not any(seen_manifest)
    assert s3_server.open_uploads(s3_bucket) == []  # the upload was aborted
    assert proxy.entries(op="AbortMultipartUpload")
    with pytest.raises(ckpt.CheckpointNotFoundError):
        _load(uri, s3_server.storage_options())


def test_failed_commit_keeps_the_previous_checkpoint(s3_server, s3_bucket, proxy):
    uri = f"s3://{s3_bucket}/overwrite/latest"
    opts = _opts(s3_server, proxy, retry={**RETRY, "deadline_s": 2.0})
    first = _state(6)
    ckpt.save(first, uri, options=ckpt.SaveOptions(storage_options=opts))
    proxy.add(Fault("status", 500), op="PutObject", path=MANIFEST, times=-1)
    with pytest.raises(StorageOperationError, match=rf"{MANIFEST}: PutObject failed after \d+ attempt"):
        ckpt.save(_state(7), uri, options=ckpt.SaveOptions(storage_options=opts, overwrite=True))
    assert _same(_load(uri, s3_server.storage_options()), first)  # still whole: old objects kept


def test_not_retryable_errors_surface_at_once(s3_server, s3_bucket, proxy):
    uri = f"s3://{s3_bucket}/denied/step-1"
    opts = _opts(s3_server, proxy)
    proxy.add(Fault("status", 403), op="UploadPart", times=-1)
    with pytest.raises(PermissionError):
        ckpt.save(_state(8), uri, options=ckpt.SaveOptions(storage_options=opts))
    denied = [e.query.rsplit("partNumber=", 1)[1] for e in proxy.log if e.fault]
    assert 1 <= len(denied) == len(set(denied)) <= 2  # no part asked twice (2 were in flight at most)
    assert s3_server.open_uploads(s3_bucket) == []


def test_conditional_put_whose_reply_was_lost_still_counts_as_ours(s3_server, s3_bucket, proxy):
    """The PUT lands, its answer is lost, the resend meets 412: the object holds our bytes, so we won."""
    storage = open_storage(f"s3://{s3_bucket}/cond-lost", **_opts(s3_server, proxy))
    proxy.add(Fault("reset_after"), op="PutObject", path="LOCK")
    assert storage.put_if_absent("LOCK", b"writer 1") is True
    puts = [(e.fault, e.status) for e in proxy.entries(op="PutObject", path="LOCK")]
    assert puts == [("reset_after", 200), (None, 412)]
    assert storage.put_if_absent("LOCK", b"writer 2") is False
    assert storage.read_bytes("LOCK") == b"writer 1"


def test_server_without_conditional_put_raises_a_typed_error(s3_server, s3_bucket, proxy):
    storage = open_storage(f"s3://{s3_bucket}/cond-501", **_opts(s3_server, proxy))
    proxy.add(Fault("status", 501), op="PutObject", path="LOCK")
    with pytest.raises(ConditionalPutUnsupportedError, match=rf"s3://{s3_bucket}/cond-501/LOCK: .*NotImplemented"):
        storage.put_if_absent("LOCK", b"x")
    assert len(proxy.entries(op="PutObject", path="LOCK")) == 1  # not retried
    assert not storage.exists("LOCK")
