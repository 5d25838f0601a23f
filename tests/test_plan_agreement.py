"""Layouts that change on some ranks only: agree_on_plan re-plans everywhere."""

from __future__ import annotations

import pytest
import torch
from dist import run_ranks

import ckpt

pytestmark = pytest.mark.dist


def _save_twice(rank: int, world: int, root: str) -> None:
    full = torch.arange(10 * 3, dtype=torch.float32).view(10, 3)
    opts = ckpt.SaveOptions(agree_on_plan=True)
    for i, cuts in enumerate(([0, 4, 7, 10], [0, 4, 8, 10])):  # rank 0's box is the same both times
        lo, hi = cuts[rank], cuts[rank + 1]
        sd = {"w": ckpt.Sharded.box(full[lo:hi].clone() + i, (10, 3), (lo, 0)), "step": i}
        ckpt.save(sd, f"{root}/s{i}", step=i, options=opts)


def test_a_boundary_moving_between_two_ranks_is_planned_again(tmp_path):
    run_ranks(_save_twice, 3, str(tmp_path))
    full = torch.arange(10 * 3, dtype=torch.float32).view(10, 3)
    for i in range(2):
        target = {"w": torch.zeros(10, 3), "step": -1}
        ckpt.load(target, str(tmp_path / f"s{i}"))
        assert torch.equal(target["w"], full + i) and target["step"] == i


def _unstorable_dtype_on_one_rank(rank: int, world: int, root: str) -> str:
    t = torch.zeros(2, dtype=torch.complex128 if rank == 0 else torch.float32)
    try:
        ckpt.save({f"r{rank}": t}, root)
    except ckpt.UnsupportedValueError as e:
        return str(e)
    return "saved"


def test_an_unstorable_dtype_on_one_rank_is_reported_by_every_rank(tmp_path):
    messages = run_ranks(_unstorable_dtype_on_one_rank, 2, str(tmp_path / "c"))
    # every rank names the failing rank and its cause (the error type comes between them)
    assert all("rank 0: " in m and "r0: dtype torch.complex128 cannot be stored" in m for m in messages), messages
