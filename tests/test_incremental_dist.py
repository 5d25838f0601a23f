"""Two ranks save incrementally through a Manager (a sharded frozen base, a sharded adapter): each rank
references its own unchanged shards; the checkpoint loads whole on one process, and resharded, bitwise."""

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import ckpt
from ckpt.options import Compression, SaveOptions
from ckpt.reader import CheckpointReader

pytestmark = pytest.mark.dist

BASE = (torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)


def _adapter(step: int) -> torch.Tensor:
    return torch.full((16, 512), float(step))


def _train(rank: int, world: int, root: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    m = ckpt.Manager(root, incremental=True, save_options=SaveOptions(compression=Compression()),
                     handle_sigterm=False)
    for step in (1, 2, 3):
        state = {"base": distribute_tensor(BASE, mesh, [Shard(0)]),
                 "adapter": distribute_tensor(_adapter(step), mesh, [Shard(0)]), "step": step}
        m.save(step, state)
        m.wait()
    m.close()
    dist.barrier()


def test_two_ranks_reference_their_unchanged_shards(tmp_path):
    root = str(tmp_path / "run")
    run_ranks(_train, 2, root)
    last = f"{root}/step-00000003"
    manifest = CheckpointReader(last).manifest
    base = manifest.tensors["base"].chunks
    assert len(base) == 2 and all(c.object.startswith("../step-00000001/") for c in base)
    assert all(c.codec is not None for c in base) and set(manifest.refs) == {"step-00000001"}
    assert len(manifest.refs["step-00000001"]) == 2  # one object per rank of the first save
    assert not any(c.object.startswith("../") for c in manifest.tensors["adapter"].chunks)
    target = {"base": torch.zeros_like(BASE), "adapter": torch.zeros(16, 512), "step": None}
    ckpt.load(target, last)
    assert torch.equal(target["base"], BASE) and torch.equal(target["adapter"], _adapter(3)) and target["step"] == 3
    rows = CheckpointReader(last).read("base", ckpt.regions.Box((100, 7), (100, 300)))
    assert torch.equal(rows, BASE[100:200, 7:307])
