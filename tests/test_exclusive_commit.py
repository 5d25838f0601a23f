"""Exactly one save commits at a location, and a rank learns of the commit from the commit itself.

The manifest is created exclusively (local: link(2); memory://, which has no conditional
create: the documented check-write-read-back fallback): a save that loses the race raises
ConcurrentSaveError and leaves the winner's checkpoint loadable bit for bit; ``overwrite=True``
replaces and says which save it replaced. After the commit point, clean-up failures are
logged and left for ``ckpt gc``, never raised, and a rank never takes a missing file for a commit.
Both backends of ``any_uri``; no processes (the multi-process races are in tests/faults/).
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
import torch
from helpers import assert_bitwise, random_tensor

import ckpt
from ckpt import commit as commit_mod
from ckpt.commit import commit, wait_committed, write_rank_index
from ckpt.format import MANIFEST, STAGING_DIR
from ckpt.storage import open_storage
from ckpt.writer import CheckpointWriter


def _state(seed: int) -> dict:
    return {"w": random_tensor((64, 32), torch.float32, seed), "b": random_tensor((17,), torch.bfloat16, seed + 1)}


def _other(seed: int) -> dict:
    """Another structure (its own staging buffer, so an async save of it never waits for the first)."""
    return {**_state(seed), "extra": random_tensor((5,), torch.int64, seed + 2)}


def _assert_holds(uri: str, seed: int) -> None:
    want = _state(seed)
    got = {k: torch.zeros_like(v) for k, v in want.items()}
    manifest = ckpt.load(got, uri, strict=False)
    for k in want:
        assert_bitwise(got[k], want[k], k)
    assert manifest.step == seed


def _hold_first_commit(monkeypatch) -> threading.Event:
    """The first manifest write waits for the returned event: a second save can pass its
    existence check while the first is about to commit, as a racing job would."""
    go, calls = threading.Event(), []
    original = commit_mod._create_manifest

    def held(storage, data):
        calls.append(1)
        if len(calls) == 1:
            assert go.wait(30)
        return original(storage, data)

    monkeypatch.setattr(commit_mod, "_create_manifest", held)
    return go


def test_racing_saves_one_commits_and_the_other_raises_concurrent_save_error(any_uri, monkeypatch):
    go = _hold_first_commit(monkeypatch)
    a = ckpt.async_save(_state(1), any_uri, step=1)
    b = ckpt.async_save(_other(2), any_uri, step=2)  # nothing committed yet: its existence check passes
    go.set()
    assert a.wait(30) == a.save_id
    with pytest.raises(ckpt.ConcurrentSaveError, match=rf"another save \({a.save_id}\) committed .* first") as e:
        b.wait(30)
    assert isinstance(e.value, ckpt.CheckpointExistsError) and b.save_id in str(e.value)
    _assert_holds(any_uri, 1)
    # A later save is refused up front, as before.
    with pytest.raises(ckpt.CheckpointExistsError):
        ckpt.save(_state(3), any_uri, step=3)


def test_overwrites_in_flight_together_commit_in_turn_and_report_what_they_replaced(any_uri, caplog):
    ckpt.save(_state(1), any_uri, step=1)
    first = json.loads(open_storage(any_uri).read_bytes(MANIFEST))["save_id"]
    overwrite = ckpt.SaveOptions(overwrite=True)
    with caplog.at_level(logging.INFO, logger="ckpt.commit"):
        a = ckpt.async_save(_state(2), any_uri, step=2, options=overwrite)
        b = ckpt.async_save(_other(3), any_uri, step=3, options=overwrite)
        a.wait(30)
        b.wait(30)
    replaced = [r.getMessage() for r in caplog.records if "replacing" in r.getMessage()]
    assert replaced == [
        f"{any_uri}: save {a.save_id} committed, replacing save {first}",
        f"{any_uri}: save {b.save_id} committed, replacing save {a.save_id}",
    ]
    _assert_holds(any_uri, 3)
    storage = open_storage(any_uri)
    assert storage.listdir("data") == [f"{b.save_id}-r00000.safetensors"]  # each commit deleted what it replaced


def test_racing_offline_writers_one_commits(any_uri):
    w1, w2 = CheckpointWriter(any_uri), CheckpointWriter(any_uri)
    w1.write_tensor("w", _state(1)["w"])
    w2.write_tensor("w", _state(2)["w"])
    w1.commit(step=1)
    with pytest.raises(ckpt.ConcurrentSaveError, match=w1.save_id):
        w2.commit(step=2)
    got = {"w": torch.zeros(64, 32)}
    ckpt.load(got, any_uri)
    assert_bitwise(got["w"], _state(1)["w"], "w")


def _stage_two_ranks(storage, save_id: str, overwrite: bool = False) -> None:
    """Both ranks' indexes of a save with one JSON value and no tensors."""
    head = {"tensors": {}, "values": {"v": save_id}, "block_bytes": 4096, "overwrite": overwrite}
    write_rank_index(storage, save_id, 0, {"rank": 0, "objects": {}, "chunks": {}, **head})
    write_rank_index(storage, save_id, 1, {"rank": 1, "objects": {}, "chunks": {}})


def test_a_waiting_rank_learns_of_the_commit_from_the_manifest_and_other_saves_staging_survives(any_uri):
    storage = open_storage(any_uri)
    other = f"{STAGING_DIR}/ffff-000007/rank-00001.json"  # a later save of the job, already staging
    storage.put_atomic(other, b"{}")
    _stage_two_ranks(storage, "s-000001")
    errors: list = []

    def wait() -> None:
        try:
            wait_committed(storage, "s-000001", 1, 30)
        except BaseException as e:
            errors.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    manifest = commit(storage, "s-000001", 2, 30)
    waiter.join(30)
    assert not waiter.is_alive() and errors == []
    assert manifest.values == {"v": "s-000001"}
    storage.invalidate()
    assert storage.listdir(STAGING_DIR) == ["ffff-000007"]  # the committer's clean-up spares others' files
    assert storage.read_bytes(other) == b"{}"


def test_a_vanished_index_is_never_taken_for_a_commit(any_uri):
    storage = open_storage(any_uri)
    storage.put_atomic("data/unrelated", b"")
    _stage_two_ranks(storage, "s-000002")
    storage.delete(f"{STAGING_DIR}/s-000002", recursive=True)  # a racing job's clean-up, or a gc
    with pytest.raises(ckpt.SaveAbortedError, match="staging index was removed, no ABORT, and there is no manifest"):
        wait_committed(storage, "s-000002", 1, 30)


def test_a_committer_that_dies_after_the_commit_still_leaves_a_success(any_uri, monkeypatch):
    """Its clean-up never ran (the waiting rank's index stays): at its timeout the waiting rank
    finds the manifest naming its save, and succeeds."""
    storage = open_storage(any_uri)
    _stage_two_ranks(storage, "s-000003")
    monkeypatch.setattr(commit_mod, "_clean_staging", lambda storage, save_id: None)
    commit(storage, "s-000003", 2, 30)
    t0 = time.monotonic()
    wait_committed(storage, "s-000003", 1, 0.5)
    assert time.monotonic() - t0 >= 0.5


def test_clean_up_failures_after_the_commit_are_logged_not_raised(any_uri, monkeypatch, caplog):
    ckpt.save(_state(1), any_uri, step=1)
    old = open_storage(any_uri).listdir("data")
    real = type(open_storage(any_uri)).delete

    def delete(self, rel, recursive=False):
        if rel.startswith("data/"):
            raise OSError(f"injected: cannot delete {rel}")
        real(self, rel, recursive)

    monkeypatch.setattr(type(open_storage(any_uri)), "delete", delete)
    with caplog.at_level(logging.WARNING, logger="ckpt.commit"):
        ckpt.save(_state(2), any_uri, step=2, options=ckpt.SaveOptions(overwrite=True))
    _assert_holds(any_uri, 2)
    warned = [r.getMessage() for r in caplog.records]
    assert any("committed, but could not delete data/" in m and "ckpt gc" in m for m in warned), warned
    assert set(old) < set(open_storage(any_uri).listdir("data"))  # the replaced object is litter now


def test_a_full_disk_names_the_object_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import builtins
    import errno

    from ckpt.storage import local

    uri = str(tmp_path / "c")
    ckpt.save(_state(1), uri, step=1)
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, buf):
            self.f.write(memoryview(buf)[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if "/data/" in str(path) and "w" in mode else f

    monkeypatch.setattr(local, "open", full_open, raising=False)
    with pytest.raises(ckpt.StorageFullError, match=r"/data/.*\.safetensors: no space left on the device") as e:
        ckpt.save(_state(2), uri, step=2, options=ckpt.SaveOptions(overwrite=True))
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert len(open_storage(uri).listdir("data")) == 1  # the partial object was removed
    _assert_holds(uri, 1)


def test_a_full_disk_at_the_staging_index_gives_back_the_written_data_object(tmp_path, monkeypatch):
    """The data just fit, its staging index did not: nothing can reference the data object any
    more, so the failed save deletes it (the disk gets its space back before any gc)."""
    import errno

    from ckpt.storage import local

    uri = str(tmp_path / "c")
    ckpt.save(_state(1), uri, step=1)
    before = set(open_storage(uri).listdir("data"))
    real = local.LocalStorage.put_atomic

    def put_atomic(self, rel, data):
        if rel.endswith(".json") and "/rank-" in f"/{rel}":
            raise ckpt.StorageFullError(errno.ENOSPC, f"{self.uri_of(rel)}: no space left on the device (injected)")
        real(self, rel, data)

    monkeypatch.setattr(local.LocalStorage, "put_atomic", put_atomic)
    with pytest.raises(ckpt.StorageFullError, match=r"rank-00000\.json: no space left"):
        ckpt.save(_state(2), uri, step=2, options=ckpt.SaveOptions(overwrite=True))
    monkeypatch.undo()
    assert set(open_storage(uri).listdir("data")) == before
    _assert_holds(uri, 1)
