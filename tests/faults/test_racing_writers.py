"""Racing writers: two jobs saving to one location, and two Managers on one run root.

Each job is two real ranks (gloo, tests/dist.py); the two jobs run at the same time from two
threads of the test. In a forced race every rank of both jobs has passed its existence check
before either commits (a barrier in front of the manifest write); in a free race they simply
start together. Either way exactly one job's ranks report success, every rank of the other
raises a CheckpointExistsError (ConcurrentSaveError when it lost at the commit), the location
loads bit for bit as the winner's state, and the loser's files are leftovers ``ckpt gc`` removes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from dist import run_ranks, run_ranks_outcomes
from helpers import assert_bitwise, random_tensor, run_cli

import ckpt

pytestmark = [pytest.mark.faults, pytest.mark.dist, pytest.mark.slow]

WORLD = 2
TRIALS = 6  # alternately forced and free races


def _state(job: int, rank: int) -> dict:
    """Job ``job``'s state on ``rank``: a row-sharded tensor and a replicated one."""
    full = random_tensor((64, 48), torch.float32, seed=job)
    return {
        "w": ckpt.Sharded.box(full[rank * 32 : (rank + 1) * 32].clone(), (64, 48), (rank * 32, 0)),
        "b": random_tensor((33,), torch.bfloat16, seed=100 + job),
    }


def _barrier_before_commit(barrier_dir: str, parties: int) -> None:
    """Hold this process's manifest write until ``parties`` ranks have planned."""
    from ckpt import commit

    original = commit._create_manifest

    def held(storage, data):
        deadline = time.monotonic() + 60
        while len(os.listdir(barrier_dir)) < parties and time.monotonic() < deadline:
            time.sleep(0.01)
        return original(storage, data)

    commit._create_manifest = held


def race_job(rank: int, world: int, uri: str, job: int, barrier_dir: str | None) -> dict:
    if barrier_dir is not None and rank == 0:
        _barrier_before_commit(barrier_dir, 2 * world)
    try:
        handle = ckpt.async_save(_state(job, rank), uri, step=job)
    except ckpt.CheckpointError as e:  # refused up front: the other job had committed already
        return {"ok": False, "error": type(e).__name__, "message": str(e)}
    if barrier_dir is not None:
        Path(barrier_dir, f"job{job}-rank{rank}").touch()
    try:
        handle.wait(60)
    except ckpt.CheckpointError as e:
        return {"ok": False, "error": type(e).__name__, "message": str(e), "save_id": handle.save_id}
    return {"ok": True, "save_id": handle.save_id}


def _assert_holds(uri: str, job: int) -> None:
    want = {k: v for k, v in _state(job, 0).items() if k == "b"}
    want["w"] = random_tensor((64, 48), torch.float32, seed=job)
    got = {"w": torch.zeros(64, 48), "b": torch.zeros(33, dtype=torch.bfloat16)}
    manifest = ckpt.load(got, uri)
    for k in want:
        assert_bitwise(got[k], want[k], k)
    assert manifest.step == job


def _run_jobs(fn, *per_job_args) -> list[list]:
    results: list = [None, None]

    def one(i: int) -> None:
        results[i] = run_ranks_outcomes(fn, WORLD, *per_job_args[i], timeout=180, start_method="forkserver")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("trial", range(TRIALS))
def test_two_jobs_racing_to_one_location_exactly_one_commits(tmp_path, trial):
    uri = str(tmp_path / "c")
    forced = trial % 2 == 0
    barrier = str(tmp_path / "barrier") if forced else None
    if barrier:
        os.makedirs(barrier)
    jobs = _run_jobs(race_job, (uri, 1, barrier), (uri, 2, barrier))
    report = "\n".join(f"job {j + 1} rank {o.rank}: {o.status} {o.value}" for j, out in enumerate(jobs) for o in out)
    assert all(o.status == "ok" for out in jobs for o in out), report
    outcomes = [[o.value for o in out] for out in jobs]
    winners = [j for j, out in enumerate(outcomes) if all(r["ok"] for r in out)]
    losers = [j for j, out in enumerate(outcomes) if not any(r["ok"] for r in out)]
    assert len(winners) == 1 and len(losers) == 1, report  # all ranks of a job agree
    loser = outcomes[losers[0]]
    assert all(r["error"] in ("CheckpointExistsError", "ConcurrentSaveError") for r in loser), report
    if forced:  # both passed their existence check: the exclusive commit decided
        assert all(r["error"] == "ConcurrentSaveError" for r in loser), report
        assert all(outcomes[winners[0]][0]["save_id"] in r["message"] for r in loser), report
    _assert_holds(uri, winners[0] + 1)
    # The loser's data, if it wrote any, is no checkpoint's: gc finds it and the winner survives.
    code, out, _ = run_cli("gc", uri, "--min-age", "0", "--yes", "--json")
    removed = json.loads(out)["removed_litter"]
    if forced:
        assert {x["path"].split("/")[-1].split("-r")[0] for x in removed if x["path"].startswith("data/")} == {
            loser[0]["save_id"]
        }
    assert sorted(os.listdir(uri)) == ["data", "manifest.json"]
    _assert_holds(uri, winners[0] + 1)


def manager_job(rank: int, world: int, root: str, job: int, steps: int, signal_dir: str) -> dict:
    t0 = time.monotonic()
    try:
        m = ckpt.Manager(root, every_steps=1, lease_s=4.0)
    except ckpt.RootInUseError as e:
        return {"ok": False, "error": type(e).__name__, "message": str(e), "elapsed": time.monotonic() - t0}
    try:
        for step in range(1, steps + 1):
            full = torch.full((16, 8), float(100 * job + step))
            m.maybe_save(step, {"w": ckpt.Sharded.box(full[rank * 8 : (rank + 1) * 8].clone(), (16, 8), (rank * 8, 0))})
            if step == 1:
                Path(signal_dir, f"job{job}-rank{rank}-saving").touch()
            time.sleep(0.2)
        m.wait()
    finally:
        m.close()
    return {"ok": True}


def test_two_managers_on_one_run_root_the_second_fails_fast_and_the_first_keeps_its_saves(tmp_path):
    root, signals = str(tmp_path / "run"), str(tmp_path / "signals")
    os.makedirs(signals)
    out: dict[int, list] = {}
    first = threading.Thread(
        target=lambda: out.setdefault(
            1, run_ranks_outcomes(manager_job, WORLD, root, 1, 40, signals, timeout=180, start_method="forkserver")
        )
    )
    first.start()
    deadline = time.monotonic() + 120
    while len(os.listdir(signals)) < WORLD and time.monotonic() < deadline:
        time.sleep(0.05)
    second = run_ranks(manager_job, WORLD, root, 2, 5, signals, start_method="forkserver", timeout=180)
    first.join()
    assert all(o.status == "ok" and o.value["ok"] for o in out[1]), out[1]
    for r in second:  # every rank of the second job, well within the 4 s lease
        assert not r["ok"] and r["error"] == "RootInUseError", r
        assert "in use by pid" in r["message"] and "renews its lease" in r["message"], r
        assert r["elapsed"] < 4.0, r
    steps = [e.step for e in ckpt.Manager(root, lease_s=None).checkpoints()]
    assert steps == list(range(1, 41)), steps
    for step in (1, 20, 40):
        got = {"w": torch.zeros(16, 8)}
        ckpt.load(got, f"{root}/step-{step:08d}")
        assert torch.equal(got["w"], torch.full((16, 8), float(100 + step)))
    assert not os.path.exists(f"{root}/_owner.json")  # released by the first job's close()
