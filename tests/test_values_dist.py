"""Every rank's non-tensor values are saved, not only rank 0's.

Pipeline stages hold different value keys (rank 1 alone holds its stage's); such keys are kept,
nested where they were, with a new plan and with a cached one. A key ranks hold with different
values keeps the lowest rank's, and the committer warns once, naming the key and the ranks.
"""

from __future__ import annotations

import logging

import pytest
import torch
from dist import run_ranks

import ckpt

pytestmark = pytest.mark.dist


def _state(rank: int, version: int) -> dict:
    state = {
        "w": ckpt.Sharded.box(torch.full((2, 3), float(rank + version)), (4, 3), (2 * rank, 0)),
        "step": version,  # the same everywhere
        "lr": [0.5 * (rank + 1)],  # differs: rank 0's is kept
    }
    if rank == 1:
        state["stage1"] = {"microbatches": version, "schedule": ["f", "b"]}  # only rank 1 has it
        state["x"] = [torch.ones(1), {"only_rank1": True}]  # a value inside a list next to a tensor
    else:
        state["x"] = [torch.ones(1)]
    return state


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def job(rank: int, world: int, root: str) -> list[str]:
    records = _Records()
    logging.getLogger("ckpt.commit").addHandler(records)
    ckpt.save(_state(rank, 1), f"{root}/v1", step=1)  # a new plan
    ckpt.save(_state(rank, 2), f"{root}/v2", step=2)  # the cached plan
    return records.messages


def test_a_value_key_only_rank_1_holds_is_saved_and_a_differing_one_is_warned_about(tmp_path):
    warnings0, warnings1 = run_ranks(job, 2, str(tmp_path), start_method="forkserver", timeout=180)
    for version in (1, 2):
        got = ckpt.read(str(tmp_path / f"v{version}"))
        assert got["step"] == version
        assert got["stage1"] == {"microbatches": version, "schedule": ["f", "b"]}
        assert got["lr"] == [0.5]  # rank 0's
        assert isinstance(got["x"], list) and len(got["x"]) == 2 and got["x"][1] == {"only_rank1": True}
        assert torch.equal(got["x"][0], torch.ones(1))
        assert torch.equal(got["w"], torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2) + version - 1)
    differ = [m for m in warnings0 if "differ between ranks" in m]
    assert len(differ) == 2 and all("'lr' (ranks 1)" in m for m in differ), warnings0  # once per save
    assert not any("stage1" in m or "x.1" in m for m in warnings0), warnings0
    assert warnings1 == []  # the committer warns, not every rank
