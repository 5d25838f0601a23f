"""A tiny deterministic data-parallel training loop driven by ckpt.Manager.

Run as one process per rank (the kill test starts and SIGKILLs them). Data
for step s is a function of s alone and gradients are all-reduced, so a
resumed run reproduces an uninterrupted one bitwise. Rank 0 appends
"step loss-hex" lines to the log after every step.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import ckpt


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8 * world, 16, generator=g)
    y = x @ torch.linspace(-1, 1, 16).unsqueeze(1) + 0.1 * torch.randn(8 * world, 1, generator=g)
    return x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank, world_size=args.world)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": 0}

    mgr = ckpt.Manager(
        args.root, every_steps=args.every, retention=ckpt.RetentionPolicy(keep_last=2), handle_sigterm=False
    )
    start = mgr.restore(state)
    if start is not None:
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for step in range(start or 0, args.steps):
        x, y = batch(step, args.rank, args.world)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        for prm in model.parameters():
            dist.all_reduce(prm.grad)
            prm.grad /= args.world
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if args.rank == 0:
            with open(args.log, "a") as f:
                f.write(f"{step} {total.item().hex()}\n")
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "step": step}
        mgr.maybe_save(step, state, metrics={"loss": total.item()})
        if args.step_sleep:
            import time

            time.sleep(args.step_sleep)
    mgr.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
