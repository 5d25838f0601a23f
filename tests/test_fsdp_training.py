"""A real FSDP2 training resume through ckpt, on CPU gloo ranks.

A 4-layer MLP (~180k parameters; dim-0 sizes 96, 509, 257 and 3, so shards are
uneven on 2, 3 and 4 ranks and the 3-row head leaves rank 3 of 4 an empty shard)
is wrapped with ``fully_shard`` per layer and at the root, trained with AdamW
under a warmup+cosine schedule on a fixed data set whose batches are drawn by a
seeded generator. After ``K`` steps on 4 ranks the model and optimizer state of
``get_state_dict`` (DTensors), the scheduler state, the step and the data
generator's state are saved with ``ckpt.save``; the run then continues ``M``
steps: the uninterrupted reference.

Fresh processes then build the model from a different seed, ``ckpt.load`` into
the ``get_state_dict`` structure, ``set_state_dict`` and train ``M`` steps:

* on 4 ranks the losses equal the reference bit for bit;
* on 2 and 3 ranks, right after loading, every parameter and optimizer tensor
  (gathered whole) is bitwise equal to what was saved; the losses then match the
  reference to a relative 1e-5, not bitwise: each rank averages the loss over
  a local batch of 24 / world samples and the gradients are averaged across a
  different number of ranks, so float sums run in another order. That moves
  fp32 results by an ulp or so (the first resumed loss, computed from bitwise
  equal weights, already differs by 1.2e-7 relative), and over 4 steps the
  observed drift stays at 1.2e-7; 1e-5 leaves ~80x headroom. A control run
  that resumes with a fresh optimizer drifts by up to 6e-2, so the tolerance
  still tells a correct resume from a broken one (asserted: > 100x 1e-5).

The data generator is the run's only source of randomness (no dropout): it is
identical on every rank, which keeps the batch stream independent of the world
size, so it is saved once as a replicated tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from dist import run_ranks
from helpers import assert_bitwise
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

import ckpt

pytestmark = pytest.mark.dist

K, M = 3, 4  # steps before the save, steps after it
GLOBAL_BATCH = 24  # divisible by 2, 3 and 4
N_SAMPLES, D_IN, N_CLASSES = 384, 96, 3
TRAIN_WORLD = 4
LOSS_RTOL = 1e-5


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D_IN)
        self.fc1 = nn.Linear(D_IN, 509)
        self.fc2 = nn.Linear(509, 257)
        self.head = nn.Linear(257, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.norm(x))))))


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed inputs and the labels of a fixed random teacher."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, D_IN, generator=g)
    teacher = torch.randn(D_IN, N_CLASSES, generator=g)
    return x, (x @ teacher).argmax(dim=1)


class Trainer:
    """Model, optimizer, schedule and data stream of one rank."""

    def __init__(self, rank: int, world: int, init_seed: int) -> None:
        self.rank, self.world = rank, world
        torch.manual_seed(init_seed)
        self.model = MLP()
        mesh = init_device_mesh("cpu", (world,))
        for layer in (self.model.fc1, self.model.fc2, self.model.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.fresh_optimizer()
        self.data_rng = torch.Generator().manual_seed(1234)
        self.x, self.y = dataset()
        self.step = 0

    def fresh_optimizer(self) -> None:
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=0.01)
        self.sched = SequentialLR(
            self.opt, [LinearLR(self.opt, 0.2, 1.0, 3), CosineAnnealingLR(self.opt, 20)], milestones=[3]
        )

    def train_step(self) -> float:
        """One step on this rank's share of the global batch; returns the global mean loss."""
        idx = torch.randint(N_SAMPLES, (GLOBAL_BATCH,), generator=self.data_rng)
        per_rank = GLOBAL_BATCH // self.world
        mine = idx[self.rank * per_rank : (self.rank + 1) * per_rank]
        loss = nn.functional.cross_entropy(self.model(self.x[mine]), self.y[mine])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        self.step += 1
        total = loss.detach().clone()
        dist.all_reduce(total)
        return (total / self.world).item()

    def state(self) -> dict:
        """What a checkpoint holds: sharded model/optimizer state and the rest of the run."""
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "sched": self.sched.state_dict(),
            "step": self.step,
            "rng": {"data": self.data_rng.get_state()},
        }

    def restore(self, state: dict) -> None:
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.sched.load_state_dict(state["sched"])
        self.step = state["step"]
        self.data_rng.set_state(state["rng"]["data"])

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Every model and optimizer tensor gathered whole (on rank 0; None elsewhere)."""
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        flat = {f"model.{k}": v for k, v in model_sd.items()}
        for fqn, st in optim_sd["state"].items():
            flat.update({f"optim.{fqn}.{name}": v for name, v in st.items()})
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in flat.items()}
        return full if self.rank == 0 else None


def train_job(rank: int, world: int, path: str) -> dict:
    t = Trainer(rank, world, init_seed=0)
    losses = [t.train_step() for _ in range(K)]
    saved = t.full_state()
    ckpt.save(t.state(), path, step=t.step, metrics={"loss": losses[-1]})
    losses += [t.train_step() for _ in range(M)]
    return {"losses": losses, "saved": saved, "lr": t.sched.get_last_lr()}


def resume_job(rank: int, world: int, path: str, control: bool) -> dict:
    t = Trainer(rank, world, init_seed=99)  # different weights: the load must replace them
    state = t.state()
    zeros = torch.zeros_like(state["rng"]["data"])
    state["rng"]["data"] = zeros.clone()
    manifest = ckpt.load(state, path)
    t.restore(state)
    out = {"loaded": t.full_state(), "step": t.step, "manifest_step": manifest.step}
    out["losses"] = [t.train_step() for _ in range(M)]
    out["lr"] = t.sched.get_last_lr()
    if control:  # the same resume, but with a fresh optimizer (its state left out)
        t.fresh_optimizer()
        state = {"model": get_model_state_dict(t.model), "sched": t.sched.state_dict(), "rng": {"data": zeros}}
        ckpt.load(state, path, strict=False)
        set_model_state_dict(t.model, state["model"])
        t.sched.load_state_dict(state["sched"])
        t.data_rng.set_state(state["rng"]["data"])
        out["control_losses"] = [t.train_step() for _ in range(M)]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, dict]:
    path = str(tmp_path_factory.mktemp("fsdp") / "step-3")
    results = run_ranks(train_job, TRAIN_WORLD, path, start_method="forkserver", timeout=300)
    assert all(r["losses"] == results[0]["losses"] for r in results)
    return path, results[0]


def _assert_bitwise_equal(loaded: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], world: int) -> None:
    assert sorted(loaded) == sorted(saved)
    assert len(saved) == 4 * 2 + 4 * 2 * 3  # weight and bias of 4 layers; step, exp_avg, exp_avg_sq each
    for key, want in saved.items():
        assert_bitwise(loaded[key], want, f"{key} after loading on {world} ranks")


def test_resume_on_same_world_is_bitwise(trained) -> None:
    path, ref = trained
    results = run_ranks(resume_job, TRAIN_WORLD, path, False, start_method="forkserver", timeout=300)
    r = results[0]
    assert r["step"] == K and r["manifest_step"] == K
    _assert_bitwise_equal(r["loaded"], ref["saved"], TRAIN_WORLD)
    assert r["losses"] == ref["losses"][K:], f"resumed {r['losses']} vs uninterrupted {ref['losses'][K:]}"
    assert r["lr"] == ref["lr"]


@pytest.mark.parametrize("world", [2, 3])
def test_resume_on_other_world(trained, world: int) -> None:
    path, ref = trained
    control = world == 3
    results = run_ranks(resume_job, world, path, control, start_method="forkserver", timeout=300)
    r = results[0]
    assert r["step"] == K
    _assert_bitwise_equal(r["loaded"], ref["saved"], world)
    want = torch.tensor(ref["losses"][K:], dtype=torch.float64)
    got = torch.tensor(r["losses"], dtype=torch.float64)
    drift = ((got - want).abs() / want.abs()).max().item()
    assert drift <= LOSS_RTOL, f"{world} ranks: losses {r['losses']} vs {ref['losses'][K:]} (rel {drift:.2e})"
    assert r["lr"] == ref["lr"]
    if control:
        bad = torch.tensor(r["control_losses"], dtype=torch.float64)
        control_drift = ((bad - want).abs() / want.abs()).max().item()
        assert control_drift > 100 * LOSS_RTOL, f"a resume without optimizer state drifts only {control_drift:.2e}"
