"""Two ranks save a Shard(0) DTensor; one rank loads it whole, bitwise."""

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import ckpt

pytestmark = pytest.mark.dist


def _save(rank: int, world: int, path: str) -> None:
    torch.manual_seed(0)
    full = torch.randn(13, 5)
    mesh = init_device_mesh("cpu", (world,))
    dt = distribute_tensor(full, mesh, [Shard(0)])
    ckpt.save({"w": dt, "rep": torch.arange(7), "step": 3}, path, step=3)
    dist.barrier()


def test_two_ranks_save_one_loads(tmp_path):
    path = str(tmp_path / "c")
    run_ranks(_save, 2, path)
    torch.manual_seed(0)
    full = torch.randn(13, 5)
    target = {"w": torch.zeros(13, 5), "rep": torch.zeros(7, dtype=torch.int64), "step": 0}
    manifest = ckpt.load(target, path)
    assert torch.equal(target["w"], full)
    assert torch.equal(target["rep"], torch.arange(7))
    assert target["step"] == 3 and manifest.step == 3
