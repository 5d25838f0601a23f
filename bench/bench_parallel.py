"""Save and load of an FSDP2 + TP training state at 4 ranks: ckpt against DCP.

The state is torchtitan's 2-D layout of a llama-shaped model: on a (dp=2, tp=2)
mesh, ``parallelize_module`` with torchtitan's plan (rowwise embedding, colwise
wq/wk/wv/w1/w3 and output, rowwise wo/w2), then ``fully_shard`` per block and at
the root over dp, so column-parallel weights are ``(_StridedShard(0), Shard(0))``.
Model and AdamW state (fp32 weights, exp_avg, exp_avg_sq, a 0-d step each) come
from ``get_state_dict``; with the defaults (``--dim 1024 --blocks 6``) they total
about 1.05 GiB. No forward is run: only the state's layout matters here.

  save   ckpt.save vs dcp.save (FileSystemWriter, each --dcp-threads value)
  load   into the same layout: ckpt.load vs dcp.load

Each figure is the median of --repeats runs, timed barrier to barrier (the slowest
rank); systems alternate order between repeats. Loads run warm (the page cache
holds what was just written) unless the cache can be dropped (--cold). Every load
is checked bitwise against the saved state, outside the timed region.

    .venv/bin/python bench/bench_parallel.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from common import (
    cpu_seconds,
    drop_page_cache,
    filesystem_of,
    format_table,
    gib,
    machine_info,
    median,
    page_cache_droppable,
    rate,
    run_ranks,
    timed_collective,
    write_json,
)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import ckpt

HERE = os.path.dirname(os.path.abspath(__file__))


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({w: nn.Linear(dim, dim, bias=False) for w in ("wq", "wk", "wv", "wo")})
        up = {w: nn.Linear(dim, hidden, bias=False) for w in ("w1", "w3")}
        self.feed_forward = nn.ModuleDict({**up, "w2": nn.Linear(hidden, dim, bias=False)})
        self.attention_norm = nn.RMSNorm(dim)
        self.ffn_norm = nn.RMSNorm(dim)


class Model(nn.Module):
    def __init__(self, vocab: int, dim: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleDict({str(i): Block(dim, hidden) for i in range(blocks)})
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)


def fsdp_tp_state(cfg: dict[str, int]) -> dict[str, Any]:
    """Model and AdamW state of the FSDP2-over-TP model, laid out as torchtitan does."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = Model(cfg["vocab"], cfg["dim"], cfg["hidden"], cfg["blocks"])
    tp = mesh["tp"]
    parallelize_module(
        model,
        tp,
        {"tok_embeddings": RowwiseParallel(input_layouts=Replicate()), "output": ColwiseParallel()},
    )
    plan = {f"attention.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")}
    plan.update({"attention.wo": RowwiseParallel(), "feed_forward.w2": RowwiseParallel()})
    plan.update({f"feed_forward.{w}": ColwiseParallel() for w in ("w1", "w3")})
    for block in model.layers.values():
        parallelize_module(block, tp, plan)
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():  # AdamW state with values of its own (not zeros), so a wrong load shows
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        opt.zero_grad()
    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd["state"]}


def _tensors(state: dict) -> list[torch.Tensor]:
    return [v for part in state.values() for v in (part.values() if part is state["model"] else _leaves(part))]


def _leaves(optim: dict) -> list[torch.Tensor]:
    return [t for per_param in optim.values() for t in per_param.values()]


def local_tensors(state: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, torch.Tensor):
            out[prefix] = node.to_local() if isinstance(node, DTensor) else node

    walk("", state)
    return out


def scramble(state: dict) -> None:
    with torch.no_grad():
        for t in local_tensors(state).values():
            t.fill_(-7)


def same(state: dict, saved: dict[str, torch.Tensor]) -> bool:
    got = local_tensors(state)
    return got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)


def bench_job(rank: int, world: int, root: str, cfg: dict[str, int], repeats: int, threads: list[int], cold: bool):
    state = fsdp_tp_state(cfg)
    saved = {k: v.clone() for k, v in local_tensors(state).items()}
    nbytes = sum(v.numel() * v.element_size() for v in _tensors(state))  # global tensors: what is stored
    savers = {"ckpt": lambda p: ckpt.save(state, p)}
    for t in threads:
        savers[f"dcp-t{t}"] = lambda p, t=t: dcp.save(state, storage_writer=FileSystemWriter(p, thread_count=t))
    loaders = {
        "ckpt": lambda p: ckpt.load(state, p),
        "dcp": lambda p: dcp.load(state, storage_reader=FileSystemReader(p)),
    }
    times: dict[str, list[float]] = {f"save {n}": [] for n in savers} | {f"load {n}": [] for n in loaders}
    cpu: dict[str, list[float]] = {k: [] for k in times}

    def timed(key: str, fn) -> None:
        c0 = cpu_seconds()
        times[key].append(timed_collective(fn))
        cpu[key].append(cpu_seconds() - c0)
    for r in range(repeats):
        order = list(savers) if r % 2 == 0 else list(reversed(savers))
        for name in order:
            path = os.path.join(root, f"{name}-{r}")
            timed(f"save {name}", partial(savers[name], path))
        for name in list(loaders) if r % 2 == 0 else list(reversed(loaders)):
            path = os.path.join(root, f"{name if name == 'ckpt' else f'dcp-t{threads[-1]}'}-{r}")
            scramble(state)
            if cold and rank == 0:
                drop_page_cache()
            timed(f"load {name}", partial(loaders[name], path))
            if not same(state, saved):
                raise AssertionError(f"rank {rank}: {name} load {r} does not match the saved state")
        dist.barrier()
        if rank == 0:
            for name in savers:
                shutil.rmtree(os.path.join(root, f"{name}-{r}"), ignore_errors=True)
        dist.barrier()
    strided = sum(1 for v in state["model"].values() if "_StridedShard" in str(v.placements))
    return {"times": times, "cpu": cpu, "nbytes": nbytes, "strided_params": strided}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=2816)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dcp-threads", default="1,4", help="DCP FileSystemWriter thread_count values")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each load (needs root)")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "bench_parallel.json"), help="JSON results")
    args = ap.parse_args()
    cfg = {"dim": args.dim, "hidden": args.hidden, "blocks": args.blocks, "vocab": args.vocab}
    threads = [int(t) for t in args.dcp_threads.split(",")]
    cold = args.cold and page_cache_droppable()
    root = tempfile.mkdtemp(prefix="bench_parallel_", dir=args.dir)
    try:
        ranks = run_ranks(bench_job, 4, root, cfg, args.repeats, threads, cold)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res = ranks[0]
    res["cpu"] = {k: [sum(r["cpu"][k][i] for r in ranks) for i in range(args.repeats)] for k in res["cpu"]}
    nbytes = res["nbytes"]
    rows, med = [], {k: median(v) for k, v in res["times"].items()}
    for k, v in res["times"].items():
        op, name = k.split(" ")
        best_dcp = min(m for n, m in med.items() if n.startswith(f"{op} dcp"))
        ratio = best_dcp / med[k] if name == "ckpt" else ""
        runs = " ".join(f"{x:.2f}" for x in v)
        rows.append([op, name, med[k], rate(nbytes, med[k]), ratio, median(res["cpu"][k]), runs])
    print(
        f"FSDP2 + TP (dp=2 x tp=2), 4 ranks, {gib(nbytes):.2f} GiB of model + AdamW state "
        f"({res['strided_params']} _StridedShard parameters), on {filesystem_of(root)}, "
        f"{'cold' if cold else 'warm'} loads, median of {args.repeats}:"
    )
    print(format_table(["op", "system", "median s", "GiB/s", "DCP s / ckpt s", "CPU s", "runs s"], rows))
    print(
        "DCP s / ckpt s compares with the fastest DCP setting; > 1 means ckpt is faster. CPU s: user+sys "
        f"summed over the ranks (robust to a busy machine). Load average at the end: {os.getloadavg()}."
    )
    write_json(args.out, {"machine": machine_info(), "config": cfg, "cold": cold, "result": res, "args": vars(args)})


if __name__ == "__main__":
    sys.exit(main())
