"""Loads on 2 gloo ranks: fresh optimizers resume bitwise (plain and FSDP2-sharded state), and
every rank raises, with every rank's reason and the single-process error type, when any fails."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import ckpt
from ckpt import CheckpointExistsError, CheckpointNotFoundError, StateDictMismatchError

pytestmark = pytest.mark.dist

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def _model(seed: int, world: int, shard: bool) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    if shard:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _steps(model, opt, rank: int, world: int, steps: range, shard: bool) -> list[float]:
    losses = []
    for i in steps:
        g = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(4 * world, 8, generator=g), torch.randn(4 * world, 1, generator=g)
        mine = slice(4 * rank, 4 * (rank + 1))
        loss = torch.nn.functional.mse_loss(model(x[mine]), y[mine])
        loss.backward()
        if not shard:  # data parallel by hand: average the gradients
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
    return losses


def _resume(rank: int, world: int, path: str, name: str, shard: bool) -> tuple[list[float], list[float], bool]:
    model = _model(0, world, shard)
    opt = OPTIMIZERS[name](model.parameters())
    _steps(model, opt, rank, world, range(3), shard)
    ckpt.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    want = _steps(model, opt, rank, world, range(3, 7), shard)

    model2 = _model(1, world, shard)
    opt2 = OPTIMIZERS[name](model2.parameters())
    state = {"model": model2.state_dict(), "optim": opt2.state_dict()}  # before the first step
    ckpt.load(state, path, options=ckpt.LoadOptions(fill=ckpt.fill_like_params(opt2)))
    sharded = any(isinstance(v, DTensor) for s in state["optim"]["state"].values() for v in s.values())
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optim"])
    return want, _steps(model2, opt2, rank, world, range(3, 7), shard), sharded


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "fsdp2"])
def test_two_ranks_resume_into_fresh_optimizers_bitwise(tmp_path, name, shard):
    results = run_ranks(_resume, 2, str(tmp_path / "c"), name, shard, start_method="forkserver", timeout=240)
    for want, got, sharded in results:
        assert got == want
        assert sharded == shard  # the state is sharded like the params


def _only_rank1_mismatches(rank: int, world: int, path: str) -> str:
    ckpt.save({"w": torch.zeros(4), "b": torch.zeros(2)}, path)
    target = {"w": torch.zeros(4), "b": torch.zeros(2)} if rank == 0 else {"w": torch.zeros(5), "b": torch.zeros(2)}
    start = time.monotonic()
    try:
        ckpt.load(target, path)
    except StateDictMismatchError as e:
        assert time.monotonic() - start < 30
        return str(e)
    return "returned"


def test_a_mismatch_on_one_rank_raises_on_every_rank(tmp_path):
    results = run_ranks(_only_rank1_mismatches, 2, str(tmp_path / "c"), start_method="forkserver", timeout=120)
    for text in results:
        first, hint = text.splitlines()[:2]
        assert first.startswith(f"load of {tmp_path / 'c'} failed on rank(s) 1; rank 1:")
        assert hint == "hint: shapes differ: the model is configured differently from the one saved"
        assert "rank 1: w: shape [5] here, [4] in the checkpoint" in text


def _errors_by_type(rank: int, world: int, root: str) -> list[str]:
    names = []
    ckpt.save({"x": torch.zeros(1)}, f"{root}/a")
    try:
        ckpt.save({"x": torch.zeros(1)}, f"{root}/a")  # exists: the same error as in one process
    except CheckpointExistsError as e:
        names.append(type(e).__name__)
    try:  # rank 1 asks for a checkpoint that does not exist
        ckpt.load({"x": torch.zeros(1)}, f"{root}/a" if rank == 0 else f"{root}/missing")
    except CheckpointNotFoundError as e:
        names.append(type(e).__name__ + (": rank 1" if "rank 1: CheckpointNotFoundError" in str(e) else ""))
    return names


def test_same_error_types_as_in_one_process(tmp_path):
    results = run_ranks(_errors_by_type, 2, str(tmp_path), start_method="forkserver", timeout=120)
    assert results == [["CheckpointExistsError", "CheckpointNotFoundError: rank 1"]] * 2


def _count_manifest_reads(fail_on_rank0: bool = False) -> list[int]:
    """Count this process's storage reads of manifest.json; rank 0's fail, if asked, as a store would."""
    from ckpt.errors import StorageOperationError
    from ckpt.storage.local import LocalStorage

    counted, real = [0], LocalStorage.read_bytes

    def read_bytes(self, rel: str) -> bytes:
        if rel == "manifest.json":
            counted[0] += 1
            if fail_on_rank0 and dist.get_rank() == 0:
                raise StorageOperationError(f"read of {self.uri_of(rel)} failed for good", "read", rel)
        return real(self, rel)

    LocalStorage.read_bytes = read_bytes  # this rank's process only
    return counted


def _load_from_a_run_root(rank: int, world: int, root: str) -> dict:
    full = {"w": torch.arange(12.0).reshape(3, 4), "step": 7}
    ckpt.save(full, f"{root}/step-7")
    if rank == 0:
        with open(f"{root}/latest", "w") as f:
            f.write('{"name": "step-7", "step": 7}')
    dist.barrier()
    counted = _count_manifest_reads()
    target = {"w": torch.zeros(3, 4), "step": 0}
    result = ckpt.load(target, root)
    assert torch.equal(target["w"], full["w"]) and target["step"] == 7 and result.step is None
    return {"reads": counted[0], "uri": result.uri}


def test_one_rank_reads_the_manifest_and_the_others_receive_it(tmp_path):
    results = run_ranks(_load_from_a_run_root, 3, str(tmp_path), start_method="forkserver", timeout=120)
    assert [r["reads"] for r in results] == [1, 0, 0]
    assert len({r["uri"] for r in results}) == 1 and results[0]["uri"].endswith("step-7")


def _load_when_rank0_cannot_read(rank: int, world: int, root: str, damage: bool) -> str:
    ckpt.save({"w": torch.ones(4)}, f"{root}/c")
    dist.barrier()
    if damage and rank == 0:  # one byte of the manifest rots before the load
        path = f"{root}/c/manifest.json"
        raw = bytearray(open(path, "rb").read())
        raw[raw.index(b'"shape":[4]') + 9] = ord("5")
        open(path, "wb").write(bytes(raw))
    dist.barrier()
    counted = _count_manifest_reads(fail_on_rank0=not damage)
    try:
        ckpt.load({"w": torch.zeros(4)}, f"{root}/c")
    except ckpt.CheckpointError as e:
        return f"{type(e).__name__} {counted[0]}: {e}"
    return "loaded"


@pytest.mark.parametrize("damage", [False, True], ids=["read_fails", "bytes_damaged"])
def test_every_rank_raises_the_error_of_rank_0s_manifest_read(tmp_path, damage):
    """A failed read on rank 0 reaches every rank as the same typed error, and damaged bytes fail the
    digest check on every rank that received them; nothing hangs."""
    results = run_ranks(_load_when_rank0_cannot_read, 2, str(tmp_path), damage, start_method="forkserver", timeout=120)
    kind = "CheckpointFormatError" if damage else "StorageOperationError"
    reason = "manifest digest mismatch" if damage else "manifest.json failed for good"
    for rank, text in enumerate(results):
        assert text.startswith(f"{kind} {1 - rank}: load of {tmp_path / 'c'} failed on rank(s) 0, 1"), text
        assert reason in text


def _restore_from_a_run_root(rank: int, world: int, root: str) -> dict:
    for step in (1, 2, 3):
        ckpt.save({"w": torch.full((4,), float(step)), "step": step}, f"{root}/step-{step:08d}", step=step)
    dist.barrier()
    counted = _count_manifest_reads()
    mgr = ckpt.Manager(root)
    target = {"w": torch.zeros(4), "step": 0}
    resume_at = mgr.restore(target)
    mgr.close()
    return {"reads": counted[0], "resume_at": resume_at, "w": target["w"].tolist()}


def test_manager_restore_lists_the_run_root_on_one_rank(tmp_path):
    """Manager.restore's listing (one manifest read per checkpoint) happens on rank 0 alone; the
    other ranks receive its entries and the chosen checkpoint's manifest by broadcast."""
    results = run_ranks(_restore_from_a_run_root, 3, str(tmp_path), start_method="forkserver", timeout=120)
    assert [r["reads"] for r in results] == [3 + 1, 0, 0]
    assert all(r["resume_at"] == 4 and r["w"] == [3.0] * 4 for r in results)
