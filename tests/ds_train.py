"""Real DeepSpeed checkpoints on CPU ranks (gloo), with DeepSpeed's own full-state getters recorded at save time.

Used by tests/test_deepspeed.py and bench/bench_foreign.py through ``tests/dist.run_ranks``.
DeepSpeed runs on its CPU accelerator without compiling anything: the optimizer
is torch's AdamW (``zero_allow_untested_optimizer``), and the shared-memory
all-reduce op it would JIT-compile on first use is marked incompatible
(``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False``), so
collectives go through gloo.
"""

from __future__ import annotations

import os
from typing import Any

import torch

# name -> (ZeRO stage, bf16, fp32 gradient accumulation: the BF16_Optimizer path under stage 1)
CONFIGS = {
    "z1_fp32": (1, False, False),
    "z2_fp32": (2, False, False),
    "z3_fp32": (3, False, False),
    "z1_bf16": (1, True, False),
    "z2_bf16": (2, True, False),
    "z3_bf16": (3, True, False),
    "bf16_optimizer": (1, True, True),
}


class TiedNet(torch.nn.Module):
    """Odd sizes (partition padding), a frozen layer, a buffer, and tied input/output weights."""

    def __init__(self, width: int = 13, vocab: int = 17, depth: int = 2) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.frozen = torch.nn.Linear(width, 5)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, width))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) * self.scale.to(self.emb.weight.dtype)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(h).float().pow(2).mean() + self.frozen(h).float().mean()


def _setup_deepspeed(rank: int, world: int):
    os.environ.update(
        DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world)
    )
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of the shm all-reduce
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def make_engine(deepspeed, stage: int, bf16: bool, fp32_accum: bool, model: torch.nn.Module):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-2)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if fp32_accum:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def full_state(deepspeed, engine, steps: int) -> dict[str, torch.Tensor]:
    """What DeepSpeed's own getters say the full state is (collectives: every rank calls this)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        # ZeRO 1/2 and BF16_Optimizer link each parameter to its optimizer-state fragments after the first
        # step of the *first* group, when later groups have no state yet: their getters would fail. Relink.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out: dict[str, torch.Tensor] = {}
    module = engine.module
    params = list(module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        for name, p in params:
            out[f"model.{name}"] = p.detach().clone()
        for name, b in module.named_buffers():
            out[f"model.{name}"] = b.detach().clone()
    for name, p in params:
        if not p.requires_grad:
            continue
        out[f"fp32.{name}"] = safe_get_full_fp32_param(p).detach().clone()
        for s in ("exp_avg", "exp_avg_sq"):
            out[f"{s}.{name}"] = safe_get_full_optimizer_state(p, s).detach().clone()
        out[f"step.{name}"] = torch.tensor(float(steps))
    return out


def train_and_save(rank: int, world: int, root: str, configs: list[str], tags: int = 2) -> dict[str, dict]:
    """For each config: train a few steps, save tags ``step1``.. (``latest`` names the last), and
    record DeepSpeed's full state at each save. Returns {config: {tag: state}} (rank 0's)."""
    deepspeed = _setup_deepspeed(rank, world)
    out: dict[str, dict] = {}
    for name in configs:
        stage, bf16, fp32_accum = CONFIGS[name]
        torch.manual_seed(0)
        engine = make_engine(deepspeed, stage, bf16, fp32_accum, TiedNet())
        g = torch.Generator().manual_seed(rank)
        refs = {}
        for step in range(1, tags + 1):
            ids = torch.randint(0, 17, (2, 4), generator=g)
            loss = engine(ids)
            engine.backward(loss)
            engine.step()
            tag = f"step{step}"
            refs[tag] = full_state(deepspeed, engine, step)
            engine.save_checkpoint(os.path.join(root, name), tag=tag, client_state={"epoch": step, "note": name})
        out[name] = refs
        engine.destroy()
    return out if rank == 0 else {}
