"""Ranks fail together and fast, with typed errors, also once the save plan is cached.

A save whose plan is cached runs no collective, so a rank that finds a problem (a value that
cannot be stored, a checkpoint already there) must tell the others through storage: it reports
under the cached plan's save id and raises at once; the others fail within seconds with an
error naming it (not at the commit timeout, not with a gloo crash), and the processes save
again afterwards. "A checkpoint exists" is CheckpointExistsError on every rank, planned or not.
"""

from __future__ import annotations

import time

import pytest
import torch
from dist import run_ranks

import ckpt

pytestmark = [pytest.mark.faults, pytest.mark.dist]

WORLD = 2


def _state(rank: int, step: int) -> dict:
    return {"w": ckpt.Sharded.box(torch.full((4, 3), float(step)), (8, 3), (4 * rank, 0)), "lr": [0.1 * step]}


def bad_value_job(rank: int, world: int, root: str) -> dict:
    options = ckpt.SaveOptions(commit_timeout_s=120)
    ckpt.save(_state(rank, 1), f"{root}/s1", step=1, options=options)  # the plan is cached from here
    bad = _state(rank, 2)
    if rank == 1:
        bad["lr"] = [object()]  # no JSON for it
    t0 = time.monotonic()
    try:
        ckpt.save(bad, f"{root}/s2", step=2, options=options)
        result = {"error": None}
    except ckpt.CheckpointError as e:
        result = {"error": type(e).__name__, "message": str(e), "rank": getattr(e, "rank", None),
                  "cause": getattr(e, "cause", None)}
    result["elapsed"] = time.monotonic() - t0
    ckpt.save(_state(rank, 3), f"{root}/s3", step=3, options=options)  # nothing is poisoned
    return result


def test_a_bad_value_on_one_rank_after_the_plan_is_cached_fails_every_rank_at_once(tmp_path):
    r0, r1 = run_ranks(bad_value_job, WORLD, str(tmp_path), start_method="forkserver", timeout=180)
    assert r1["error"] == "UnsupportedValueError" and "lr" in r1["message"], r1
    assert r0["error"] == "SaveAbortedError" and r0["rank"] == 1 and r0["cause"] == "UnsupportedValueError", r0
    assert "rank 1: UnsupportedValueError" in r0["message"], r0
    assert r0["elapsed"] < 20 and r1["elapsed"] < 20, (r0, r1)  # the commit timeout is 120 s
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.load({"w": torch.zeros(8, 3)}, str(tmp_path / "s2"), strict=False)
    got = {"w": torch.zeros(8, 3), "lr": [0.0]}
    ckpt.load(got, str(tmp_path / "s3"))
    assert torch.equal(got["w"], torch.full((8, 3), 3.0)) and got["lr"] == [pytest.approx(0.3)]


def exists_job(rank: int, world: int, root: str) -> list:
    out = []
    for i in range(3):  # the first refusal is of a new structure (planned: a collective), the later ones reuse
        ckpt.save(_state(rank, 1), f"{root}/c{i}", step=1)
        state = {**_state(rank, 2), **({"new": torch.zeros(2)} if i == 0 else {})}
        try:
            ckpt.save(state, f"{root}/c{i}", step=2)
            out.append(None)
        except ckpt.CheckpointError as e:
            out.append(type(e).__name__)
    return out


def test_an_existing_checkpoint_is_checkpoint_exists_error_on_every_rank(tmp_path):
    for rank, errors in enumerate(run_ranks(exists_job, WORLD, str(tmp_path), start_method="forkserver", timeout=180)):
        assert errors == ["CheckpointExistsError"] * 3, (rank, errors)
