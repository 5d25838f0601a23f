"""The commit protocol on S3 (SeaweedFS) under racing writers and faults (tests/faultproxy.py).

The manifest is a PutObject with ``If-None-Match: *``: of racing saves one commits, the other
raises ConcurrentSaveError. A lost reply to that PUT (the server stored it, the client saw a
reset) is retried, answered 412, and still counts as this save's commit. 500s, 503s and stalls
on the commit's requests are retried. Failures after the commit point (deleting the replaced
objects and the staging files) never fail the save: they are logged, and gc removes the leftovers.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from faultproxy import Fault, FaultProxy
from helpers import assert_bitwise, random_tensor

import ckpt
from ckpt import commit as commit_mod
from ckpt.catalog import entry_at
from ckpt.format import MANIFEST
from ckpt.litter import find_litter, remove_litter
from ckpt.storage import open_storage

pytestmark = [pytest.mark.s3, pytest.mark.faults]

RETRY = {"max_attempts": 8, "base_delay_s": 0.02, "max_delay_s": 0.2, "deadline_s": 10.0}


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint_url) as p:
        yield p


def _opts(server, proxy: FaultProxy, retry=None) -> dict:
    return server.storage_options(
        endpoint_url=proxy.endpoint_url,
        config_kwargs={"read_timeout": 2, "connect_timeout": 2},
        retry=retry or RETRY,
    )


def _state(seed: int, extra: bool = False) -> dict:
    sd = {"w": random_tensor((256, 64), torch.float32, seed), "step": seed}
    if extra:  # another structure: its own staging buffer, so an async save of it never waits
        sd["x"] = random_tensor((7,), torch.int64, seed)
    return sd


def _assert_holds(uri: str, opts: dict, seed: int) -> ckpt.Manifest:
    got = {"w": torch.zeros(256, 64), "step": -1}
    manifest = ckpt.load(got, uri, strict=False, options=ckpt.LoadOptions(storage_options=opts))
    assert_bitwise(got["w"], _state(seed)["w"], "w")
    assert got["step"] == seed
    return manifest


def test_racing_saves_on_s3_one_commits_and_the_other_raises(s3_server, s3_bucket, monkeypatch):
    uri, opts = f"s3://{s3_bucket}/race/c", s3_server.storage_options()
    go, calls = threading.Event(), []
    original = commit_mod._create_manifest

    def held(storage, data):  # the first commit waits until the second save has passed its checks
        calls.append(1)
        if len(calls) == 1:
            assert go.wait(60)
        return original(storage, data)

    monkeypatch.setattr(commit_mod, "_create_manifest", held)
    options = ckpt.SaveOptions(storage_options=opts)
    a = ckpt.async_save(_state(1), uri, step=1, options=options)
    b = ckpt.async_save(_state(2, extra=True), uri, step=2, options=options)
    go.set()
    assert a.wait(60) == a.save_id
    with pytest.raises(ckpt.ConcurrentSaveError, match=a.save_id):
        b.wait(60)
    _assert_holds(uri, opts, 1)


def test_a_lost_reply_to_the_conditional_manifest_put_is_still_this_saves_commit(s3_server, s3_bucket, proxy):
    uri, opts = f"s3://{s3_bucket}/lost-reply/c", _opts(s3_server, proxy)
    proxy.add(Fault("reset_after"), op="PutObject", path=MANIFEST)
    ckpt.save(_state(3), uri, step=3, options=ckpt.SaveOptions(storage_options=opts))
    puts = proxy.entries(op="PutObject", path=MANIFEST)
    assert [e.fault for e in puts][:1] == ["reset_after"] and 412 in [e.status for e in puts], puts
    _assert_holds(uri, opts, 3)


def test_server_errors_and_stalls_on_the_commit_are_retried(s3_server, s3_bucket, proxy):
    uri, opts = f"s3://{s3_bucket}/flaky-commit/c", _opts(s3_server, proxy)
    proxy.add(Fault("status", 500), op="PutObject", path=MANIFEST, times=2)
    proxy.add(Fault("status", 503), op="PutObject", path="rank-00000.json")
    proxy.add(Fault("status", 503), op="List", times=2)
    proxy.add(Fault("stall", seconds=4), op="PutObject", path="rank-00000.json")
    ckpt.save(_state(4), uri, step=4, options=ckpt.SaveOptions(storage_options=opts))
    assert len([e for e in proxy.log if e.fault]) == 6
    _assert_holds(uri, opts, 4)
    staging = open_storage(uri, **opts)
    left = {sid: staging.listdir(f"_staging/{sid}") for sid in staging.listdir("_staging")}
    assert left == {}, (left, [(e.op, e.path, e.status, e.fault) for e in proxy.log])


def test_failures_after_the_commit_point_never_fail_the_save(s3_server, s3_bucket, proxy, caplog):
    uri = f"s3://{s3_bucket}/after-commit/c"
    opts = _opts(s3_server, proxy, retry={**RETRY, "deadline_s": 1.0})
    ckpt.save(_state(5), uri, step=5, options=ckpt.SaveOptions(storage_options=opts))
    old = set(open_storage(uri, **opts).listdir("data"))
    for op in ("DeleteObject", "DeleteObjects"):
        proxy.add(Fault("status", 500), op=op, times=-1)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ckpt.commit"):
        ckpt.save(_state(6), uri, step=6, options=ckpt.SaveOptions(storage_options=opts, overwrite=True))
    assert time.monotonic() - t0 < 30
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "could not delete _staging/" in warned and "of the replaced save" in warned, warned
    proxy.clear()
    _assert_holds(uri, opts, 6)
    storage = open_storage(uri, **opts)
    assert old <= set(storage.listdir("data"))  # the replaced objects are leftovers now ...
    entry = entry_at(uri, ".", opts)
    litter = find_litter(entry, time.time(), 0.0, opts)
    assert {x.path for x in litter} >= {f"data/{o}" for o in old}
    remove_litter(uri, litter, opts)  # ... which gc removes
    assert set(storage.listdir("data")) == {o.split("/")[-1] for o in _assert_holds(uri, opts, 6).objects}
    assert storage.listdir("_staging") == []
