"""A rank killed with SIGKILL mid-write is noticed within seconds, not at the commit timeout.

The victim's write of its data object stalls half-way (after the bytes so far are durable), it
reports its pid, and the test SIGKILLs it: no error report, no ``finally`` of the victim runs.
Only its heartbeat stops. The commit timeout is left at its default (600 s): the surviving rank
must still raise RankLostError naming the victim within 15 s of the kill, nothing new may be
committed, and the checkpoint the save was overwriting must load bitwise as before.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from dist import run_ranks_outcomes

import ckpt
from ckpt.storage import LocalStorage

pytestmark = [pytest.mark.dist, pytest.mark.faults]

WORLD = 2
ROWS = 64  # per rank, of 1 KiB each


def _shard(version: int, rank: int) -> torch.Tensor:
    return torch.randn(ROWS, 256, generator=torch.Generator().manual_seed(1000 * version + rank))


def _state(version: int, rank: int) -> dict:
    return {"w": ckpt.Sharded.box(_shard(version, rank), (ROWS * WORLD, 256), (ROWS * rank, 0)), "step": version}


def _whole(version: int) -> torch.Tensor:
    return torch.cat([_shard(version, r) for r in range(WORLD)])


class _Stall:
    """Writes the header, then half of the first chunk (fsynced), drops the pid file and sleeps."""

    def __init__(self, f, marker: str) -> None:
        self.f, self.marker, self.calls = f, marker, 0

    def write(self, buf) -> int:
        self.calls += 1
        if self.calls == 1:
            return self.f.write(buf)
        self.f.write(memoryview(buf)[: len(buf) // 2])
        os.fsync(self.f.fileno())
        Path(self.marker + ".tmp").write_text(str(os.getpid()))
        os.replace(self.marker + ".tmp", self.marker)
        time.sleep(600)  # SIGKILL arrives here
        raise AssertionError("the victim was not killed")


def _stall_data_writes(marker: str) -> None:
    original = LocalStorage.open_write

    def open_write(self, rel):
        @contextmanager
        def cm():
            with original(self, rel) as f:
                yield _Stall(f, marker) if rel.startswith("data/") else f

        return cm()

    LocalStorage.open_write = open_write


def job(rank: int, world: int, root: str, victim: int) -> dict:
    path = f"{root}/ckpt"
    ckpt.save(_state(1, rank), path, step=1)  # v1, committed; the plan is cached from here
    if rank == victim:
        _stall_data_writes(f"{root}/victim.pid")
    options = ckpt.SaveOptions(overwrite=True, heartbeat_s=1.0)  # commit_timeout_s: the default 600 s
    assert options.commit_timeout_s == 600
    try:
        ckpt.save(_state(2, rank), path, step=2, options=options)
    except ckpt.SaveAbortedError as e:
        return {"error": type(e).__name__, "rank": e.rank, "cause": e.cause, "message": str(e), "at": time.time()}
    return {"error": None, "at": time.time()}


class _Killer(threading.Thread):
    def __init__(self, marker: Path) -> None:
        super().__init__(daemon=True)
        self.marker, self.killed_at = marker, None

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.marker.exists():
            os.kill(int(self.marker.read_text()), signal.SIGKILL)
            self.killed_at = time.time()


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-killed", "committer-killed"])
def test_a_rank_killed_mid_write_fails_the_other_within_seconds_naming_it(tmp_path: Path, victim: int) -> None:
    killer = _Killer(tmp_path / "victim.pid")
    killer.start()
    outcomes = run_ranks_outcomes(job, WORLD, str(tmp_path), victim, timeout=180, start_method="forkserver")
    killer.join(timeout=5)
    report = "\n".join(f"rank {o.rank}: {o.status} (exit {o.exitcode}): {o.value}" for o in outcomes)
    assert killer.killed_at is not None, f"the victim never stalled mid-write:\n{report}"
    assert outcomes[victim].status == "died" and outcomes[victim].exitcode == -signal.SIGKILL, report

    survivor = outcomes[1 - victim]
    assert survivor.status == "ok", report
    got = survivor.value
    assert got["error"] == "RankLostError", report
    assert got["rank"] == victim and got["cause"] == "RankLostError", report
    assert f"rank {victim}: RankLostError: no heartbeat" in got["message"], report
    latency = got["at"] - killer.killed_at
    print(f"victim rank {victim}: survivor raised RankLostError {latency:.1f}s after the kill")
    assert latency < 15, report  # heartbeat 1 s, lost after 5; the commit timeout is 600 s

    # Nothing committed: the location still holds v1, bitwise, and says why v2 did not commit.
    target = {"w": torch.zeros(ROWS * WORLD, 256), "step": -1}
    manifest = ckpt.load(target, str(tmp_path / "ckpt"))
    assert manifest.step == 1 and target["step"] == 1
    assert torch.equal(target["w"].view(torch.uint8), _whole(1).view(torch.uint8))
    aborts = list((tmp_path / "ckpt" / "_staging").glob("*/ABORT"))
    assert len(aborts) == 1 and "RankLostError" in aborts[0].read_text(), aborts
