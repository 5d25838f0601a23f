"""One rank of the demo's training job: FSDP2 on CPU gloo, checkpointed by ``ckpt.Manager``.

Every rank appends what happens to its own JSON-lines event file (one
``os.write`` per line on an ``O_APPEND`` descriptor), so the driver can watch
progress, decide when to SIGKILL the job, and still read every event a killed
rank got to write.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckpt
from ckpt.reader import CheckpointReader

from .model import ModelConfig, Transformer, batch, eval_tokens, lr_at, token_loss_sum


@dataclass(frozen=True)
class RunSpec:
    """What one launch of the job does (the same on every rank; picklable)."""

    model: ModelConfig
    root: str  # the Manager's root
    events: str  # this launch's event file prefix: <events>-rank<r>.jsonl
    steps: int  # the job trains up to this step
    every: int | None  # save every N steps (None: no checkpoints, e.g. the uninterrupted reference)
    keep_last: int
    daemon: str | None  # ckpt-server address: saves are handed to it, restores ask its RAM tier
    restore: bool  # resume from the latest complete checkpoint under root
    commit_timeout_s: float = 60.0


class Events:
    """Append-only JSON lines, each written whole by one ``os.write``."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, kind: str, **fields: Any) -> None:
        os.write(self.fd, (json.dumps({"kind": kind, "t": time.time(), **fields}) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


def read_events(path: str) -> list[dict[str, Any]]:
    """The events in a file; a torn last line (a kill mid-write) is dropped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def build(cfg: ModelConfig, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model, sharded FSDP2-style (each block, then the root) over all ranks, and AdamW."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank: fully_shard keeps each rank's rows
    model = Transformer(cfg)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt


def training_state(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    """What a checkpoint holds: sharded model and optimizer state (DTensors) and the step.

    The data stream and the learning rate are functions of the step, so the
    step is all the rest of the run needs.
    """
    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd, "step": step}


def global_mean(x: float, world: int) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world


@torch.no_grad()
def sharded_eval(model: torch.nn.Module, cfg: ModelConfig, rank: int, world: int) -> float:
    """Held-out loss of the sharded model: each rank scores its slice of the set."""
    tokens = eval_tokens(cfg)
    per = tokens.shape[0] // world
    local = token_loss_sum(model, tokens[rank * per : (rank + 1) * per]).item()
    return global_mean(local, world) * world / (tokens.shape[0] * cfg.seq)


def ram_tier_report(daemon: str, uri: str) -> dict[str, Any]:
    """Whether ``ckpt.load(..., LoadOptions(daemon=...))`` read ``uri`` from the daemon's RAM.

    The same test ``load`` applies: the daemon's copy is used when it is of the
    very save the manifest names, and then serves every data object it holds (the
    tier holds tensor bytes; the small per-object chunk indexes come from storage).
    """
    from ckpt.client import ram_tier_lookup

    manifest = CheckpointReader(uri).manifest
    found = ram_tier_lookup(daemon, uri)
    data = {o: n for o, n in manifest.objects.items() if o.endswith(".safetensors")}
    total = sum(data.values())
    if found is None:
        return {"served": False, "why": "the daemon holds no copy of it", "bytes": 0, "total": total}
    save_id, directory, objects = found
    if save_id != manifest.save_id:
        return {"served": False, "why": f"the daemon's copy is of another save ({save_id})", "bytes": 0, "total": total}
    mine = objects & set(data)
    return {
        "served": True,
        "bytes": sum(data[o] for o in mine),
        "total": total,
        "objects": len(mine),
        "of": len(data),
        "directory": directory,
    }


def train_rank(rank: int, world: int, spec: RunSpec) -> dict[str, Any]:
    """Train (or resume, then train) up to ``spec.steps``; report through the event file."""
    cfg = spec.model
    ev = Events(f"{spec.events}-rank{rank}.jsonl")
    model, opt = build(cfg, world)
    mgr = ckpt.Manager(
        spec.root,
        every_steps=spec.every,
        retention=ckpt.RetentionPolicy(keep_last=spec.keep_last),
        save_options=ckpt.SaveOptions(daemon=spec.daemon, commit_timeout_s=spec.commit_timeout_s),
        load_options=ckpt.LoadOptions(daemon=spec.daemon),
    )
    start = 1
    if spec.restore:
        state = training_state(model, opt, 0)  # the structure to fill (optimizer state initialised)
        dist.barrier()
        t0 = time.perf_counter()
        resume_at = mgr.restore(state)
        seconds = time.perf_counter() - t0
        if resume_at is not None:
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            start = resume_at
        fields: dict[str, Any] = {"resume_at": resume_at, "seconds": seconds, "loaded_step": state["step"]}
        if rank == 0 and resume_at is not None and spec.daemon:
            fields["ram_tier"] = ram_tier_report(
                spec.daemon, f"{spec.root.rstrip('/')}/{mgr.name_format.format(step=resume_at - 1)}"
            )
        ev("restored", **fields)
        ev("eval", step=start - 1, loss=sharded_eval(model, cfg, rank, world))
    ev("started", world=world, start=start)
    for step in range(start, spec.steps + 1):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        tokens = batch(cfg, step, rank, world)
        loss = token_loss_sum(model, tokens) / tokens[:, 1:].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        loss_g = global_mean(loss.item(), world)
        compute_s = time.perf_counter() - t0
        due = bool(spec.every) and step % spec.every == 0
        metrics = {"loss": loss_g}
        if due:
            metrics["eval_loss"] = sharded_eval(model, cfg, rank, world)
            ev("eval", step=step, loss=metrics["eval_loss"])
        if rank == 0:
            ev("step", step=step, loss=loss_g, lr=lr_at(cfg, step), seconds=compute_s)
        state = training_state(model, opt, step)
        t1 = time.perf_counter()
        handle = mgr.maybe_save(step, state, metrics=metrics)
        stall = time.perf_counter() - t1
        if handle is not None:
            ev("save", step=step, stall_s=stall, timings=dict(handle.timings), save_id=handle.save_id)
        if mgr.should_stop:  # an emergency (SIGTERM) save has committed: leave like a preempted job
            break
    mgr.close()
    ev("finished", step=spec.steps)
    ev.close()
    return {"rank": rank}
