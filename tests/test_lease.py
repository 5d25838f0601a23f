"""One job per run root: the owner record (ckpt.lease) refuses a second live job within seconds,
is taken over from a dead one, and tells a job whose record was taken over. In one process,
with the other job's identity written into its record; tests/faults/test_racing_writers.py
runs two real jobs."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch

import ckpt
from ckpt.lease import OWNER, RootLease
from ckpt.storage import open_storage

LEASE_S = 2.0  # renewed every 0.5 s


@pytest.fixture
def root(any_uri):
    """A location on each backend, never left empty (the memory backend's fixture removes it)."""
    open_storage(any_uri).put_atomic("step-00000001/keep", b"")
    return any_uri


def _other_job(lease: RootLease, pid: int) -> RootLease:
    """``lease`` as another process on this host (``pid``) would hold it."""
    lease.doc["pid"] = pid
    return lease


def test_a_live_owner_is_refused_within_a_renew_period_and_released_on_close(root):
    storage = open_storage(root)
    first = RootLease(storage, LEASE_S)
    first.acquire()
    try:
        second = _other_job(RootLease(open_storage(root), LEASE_S), os.getppid())  # alive, not us
        t0 = time.monotonic()
        with pytest.raises(ckpt.RootInUseError, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}"):
            second.acquire()
        assert time.monotonic() - t0 < LEASE_S
    finally:
        first.release()
    assert not storage.exists(OWNER)


def test_a_record_that_is_not_renewed_is_taken_over_after_the_lease(root):
    storage = open_storage(root)
    dead = RootLease(storage, LEASE_S)
    dead.doc["host"] = "another-host"  # its pid cannot be checked from here
    storage.put_atomic(OWNER, json.dumps(dead.doc).encode())
    new = RootLease(storage, LEASE_S)
    t0 = time.monotonic()
    new.acquire()
    try:
        assert time.time() - dead.doc["renewed"] >= LEASE_S  # not before the record's lease ran out
        assert time.monotonic() - t0 < 3 * LEASE_S
        assert json.loads(storage.read_bytes(OWNER))["owner"] == new.doc["owner"]
    finally:
        new.release()


def test_a_record_of_a_dead_process_on_this_host_or_of_the_same_job_is_taken_over_at_once(root, monkeypatch):
    storage = open_storage(root)
    for how in ("dead pid", "same job"):
        old = RootLease(storage, 3600.0)
        if how == "dead pid":
            old.doc["pid"] = 2**30  # no such process
        else:
            monkeypatch.setenv("SLURM_JOB_ID", "4242")
            old.doc.update(pid=os.getppid(), job="SLURM_JOB_ID=4242")
        storage.put_atomic(OWNER, json.dumps(old.doc).encode())
        new = RootLease(storage, 3600.0)
        t0 = time.monotonic()
        new.acquire()
        new.release()
        assert time.monotonic() - t0 < 5, how


def test_an_owner_whose_record_was_taken_over_stops_its_manager(tmp_path):
    root = str(tmp_path / "run")
    m = ckpt.Manager(root, every_steps=1, lease_s=LEASE_S)
    try:
        m.maybe_save(1, {"w": torch.ones(3)})
        m.wait()
        thief = RootLease(open_storage(root), LEASE_S)
        thief.doc.update(host="another-host", pid=1)
        open_storage(root).put_atomic(OWNER, json.dumps(thief.doc).encode())
        deadline = time.monotonic() + 5 * LEASE_S
        while m._lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ckpt.RootInUseError, match="taken over by pid 1 on another-host"):
            m.maybe_save(2, {"w": torch.ones(3)})
    finally:
        m.close()
    assert json.loads(open_storage(root).read_bytes(OWNER))["host"] == "another-host"  # not ours to remove


def test_managers_one_after_another_in_one_process_share_the_root(tmp_path):
    root = str(tmp_path / "run")
    for step in (1, 2):
        m = ckpt.Manager(root, every_steps=1, lease_s=LEASE_S)
        m.maybe_save(step, {"w": torch.full((3,), float(step))})
        m.close()
    assert not open_storage(root).exists(OWNER)
    assert [e.step for e in ckpt.Manager(root, lease_s=None).checkpoints()] == [1, 2]
