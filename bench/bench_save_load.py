"""Save, load and reshard-load: ckpt against torch.distributed.checkpoint (DCP).

Both systems handle the same state in the same run: a transformer-shaped model
(bf16 weights) with AdamW state (fp32 master weights, exp_avg, exp_avg_sq and a
0-dim step per parameter) plus a few JSON-able training values, as DTensors.

  save    2 ranks, Shard(0)                         ckpt.save vs dcp.save (each thread_count given)
  load    2 ranks, Shard(0) -> 2 ranks, Shard(0)    ckpt.load vs dcp.load
  reshard 2 ranks, Shard(0) -> 3 ranks, Shard(1) (1-D tensors Shard(0))

Each figure is the median of --repeats runs, timed barrier to barrier (the slowest
rank). Systems alternate order between repeats. Loads run cold (page cache dropped
first, when this machine allows it) and warm. Every load is checked bitwise
against the data that was saved, outside the timed region.

    .venv/bin/python bench/bench_save_load.py --gib 1 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from common import (
    cpu_seconds,
    drop_page_cache,
    filesystem_of,
    format_table,
    io_counters,
    machine_info,
    median,
    page_cache_droppable,
    rate,
    run_ranks,
    timed_collective,
    write_json,
)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import ckpt

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = {"save": 1.1, "load": 1.2, "reshard": 2.0}  # ckpt speed / DCP speed, from the issue


# --------------------------------------------------------------------------- the state


@dataclass(frozen=True)
class ModelShape:
    """A llama-like decoder: separate q/k/v/o (+ q/k/v biases), SwiGLU MLP, RMSNorm, untied head."""

    hidden: int
    ffn: int
    vocab: int
    layers: int

    @classmethod
    def for_gib(cls, gib: float, layers: int = 4) -> ModelShape:
        """Pick the hidden size so that weights + AdamW state come to about ``gib``."""
        per_h2 = 2 * 16 + layers * (4 + 3 * 2.75)  # parameters / hidden^2 (vocab = 16 * hidden)
        hidden = max(48, int(round(math.sqrt(gib * (1 << 30) / (BYTES_PER_PARAM * per_h2)) / 12)) * 12)
        return cls(hidden, int(hidden * 2.75), 16 * hidden, layers)

    def params(self) -> list[tuple[str, tuple[int, ...]]]:
        h, f = self.hidden, self.ffn
        out = [("embed.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"layers.{i}."
            out += [(p + "norm1.weight", (h,))]
            out += [(p + f"attn.{n}.weight", (h, h)) for n in "qkvo"]
            out += [(p + f"attn.{n}.bias", (h,)) for n in "qkv"]
            out += [(p + "norm2.weight", (h,))]
            out += [(p + "mlp.gate.weight", (f, h)), (p + "mlp.up.weight", (f, h)), (p + "mlp.down.weight", (h, f))]
        out += [("norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out


# bf16 weight + fp32 master, exp_avg, exp_avg_sq
BYTES_PER_PARAM = 2 + 3 * 4


def tensor_specs(shape: ModelShape) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every tensor of the state as (flat key, global shape, dtype)."""
    specs = []
    for name, s in shape.params():
        specs.append((f"model.{name}", s, torch.bfloat16))
        for slot in ("master", "exp_avg", "exp_avg_sq"):
            specs.append((f"optim.state.{name}.{slot}", s, torch.float32))
        specs.append((f"optim.state.{name}.step", (), torch.float32))
    return specs


def state_bytes(shape: ModelShape) -> int:
    return sum(math.prod(s) * dt.itemsize for _, s, dt in tensor_specs(shape))


def content(key: str, shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype):
    """Deterministic, finite, incompressible-looking values of ``global[key][box]``.

    Element ``(i, j, ...)`` is ``h0(i) ^ h1(j) ^ ...`` (per-dimension hashes of
    the global index, formatted as a float of magnitude in [2^-7, 2)), so any
    rank produces any region in a few passes, without the full tensor, and a
    resharded load is checked bitwise.
    """
    seed = sum(ord(c) * 131**i for i, c in enumerate(key)) % (1 << 31)
    if not shape:
        return torch.tensor(float(seed % 1000), dtype=dtype)
    wide = torch.int16 if dtype.itemsize == 2 else torch.int32
    x = None
    for d, (o, n) in enumerate(zip(offsets, sizes)):
        h = torch.arange(o, o + n, dtype=torch.int64) + seed * (d + 1)
        h = (h * 0x2545F491) & 0xFFFFFFFF
        h ^= h >> 15
        h = (h * 0x5BD1E995) & 0xFFFFFFFF
        h ^= h >> 13
        view = [1] * len(shape)
        view[d] = n
        h = h.to(wide).view(view)
        x = h if x is None else x ^ h
    x = x.expand(sizes).contiguous()
    if dtype.itemsize == 2:  # bf16: sign, exponent 120..127, 7 mantissa bits
        x &= 0x83FF - 0x10000
        x |= 0x3C00
    else:  # fp32: sign, exponent 120..127, 23 mantissa bits
        x &= 0x83FFFFFF - 0x100000000
        x |= 0x3C000000
    return x.view(dtype)


def placements_for(ndim: int, layout: str):
    """``save``: Shard(0) everywhere (FSDP-like). ``reshard``: Shard(1) for matrices."""
    if layout == "reshard" and ndim >= 2:
        return [Shard(1)]
    return [Shard(0)]


def build_state(shape: ModelShape, layout: str, world: int, empty: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """The nested state dict of DTensors, and each key's expected local tensor.

    With ``empty`` the tensors are zeros (a load target) and the JSON values differ.
    """
    mesh = init_device_mesh("cpu", (world,))
    state: dict[str, Any] = {"model": {}, "optim": {"state": {}}}
    expected: dict[str, torch.Tensor] = {}
    for key, s, dtype in tensor_specs(shape):
        if s:
            placements = placements_for(len(s), layout)
            local_shape, offsets = compute_local_shape_and_global_offset(s, mesh, placements)
            want = content(key, s, tuple(offsets), tuple(local_shape), dtype)
            local = torch.zeros_like(want) if empty else want.clone()
            stride = tuple(math.prod(s[d + 1 :]) for d in range(len(s)))
            value = DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(s), stride=stride)
        else:
            want = content(key, s, (), (), dtype)
            value = torch.zeros_like(want) if empty else want.clone()
        expected[key] = want
        _set(state, key, value)
    names = [n for n, _ in shape.params()]
    state["optim"]["param_groups"] = [
        {"lr": 0.0 if empty else 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "params": names}
    ]
    state["train"] = {"step": 0 if empty else 1000, "tokens_seen": 0 if empty else 4_096_000}
    return state, expected


def _set(root: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    # parameter names contain dots: model.<name> and optim.state.<name>.<slot>
    if parts[0] == "model":
        root["model"][".".join(parts[1:])] = value
    else:
        root["optim"]["state"].setdefault(".".join(parts[2:-1]), {})[parts[-1]] = value


def _get(root: dict, key: str) -> Any:
    parts = key.split(".")
    if parts[0] == "model":
        return root["model"][".".join(parts[1:])]
    return root["optim"]["state"][".".join(parts[2:-1])][parts[-1]]


def local_of(v: Any) -> torch.Tensor:
    return v.to_local() if isinstance(v, DTensor) else v


def zero_state(state: dict, shape: ModelShape) -> None:
    for key, _, _ in tensor_specs(shape):
        local_of(_get(state, key)).zero_()
    state["optim"]["param_groups"][0]["lr"] = 0.0
    state["train"] = {"step": 0, "tokens_seen": 0}


def check_state(state: dict, expected: dict[str, torch.Tensor], system: str) -> None:
    """Bitwise equality of every local tensor and the JSON values; raise naming the key."""
    for key, want in expected.items():
        got = local_of(_get(state, key))
        if got.dtype != want.dtype or got.shape != want.shape:
            raise AssertionError(f"{system}: {key}: got {got.dtype}{tuple(got.shape)}, want {want.dtype}{want.shape}")
        a, b = got.contiguous().reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
        if not torch.equal(a, b):
            bad = (a != b).nonzero()[:3].flatten().tolist()
            raise AssertionError(f"{system}: {key}: loaded bytes differ from the saved ones (first at {bad})")
    lr = state["optim"]["param_groups"][0]["lr"]
    if lr != 3e-4 or state["train"].get("step") != 1000:
        raise AssertionError(f"{system}: JSON values not loaded (lr={lr}, train={state['train']})")


# --------------------------------------------------------------------------- the systems


def ckpt_save(state: dict, path: str) -> None:
    ckpt.save(state, path)


def dcp_save(threads: int) -> Callable[[dict, str], None]:
    def save(state: dict, path: str) -> None:
        dcp.save(state, storage_writer=FileSystemWriter(path, thread_count=threads))

    return save


def ckpt_load(state: dict, path: str) -> None:
    ckpt.load(state, path)


def dcp_load(state: dict, path: str) -> None:
    dcp.load(state, storage_reader=FileSystemReader(path))


@dataclass
class Config:
    shape: ModelShape
    root: str
    repeats: int
    dcp_threads: tuple[int, ...]
    cold: bool  # page cache can be dropped


def _io_delta(before: dict[str, int]) -> dict[str, int]:
    after = io_counters()
    return {k: after.get(k, 0) - before.get(k, 0) for k in ("rchar", "read_bytes", "wchar", "write_bytes")}


def _run(fn: Callable[[], None], cold: bool, rank: int) -> dict[str, Any]:
    """One timed collective operation (after a cache drop if ``cold``)."""
    if rank == 0:
        os.sync()  # earlier writes must not be written back inside the timed region
        if cold:
            drop_page_cache()
    before, cpu = io_counters(), cpu_seconds()
    seconds = timed_collective(fn)
    return {"seconds": seconds, "cpu_s": cpu_seconds() - cpu, "io": _io_delta(before)}


def save_phase(rank: int, world: int, cfg: Config) -> dict[str, list[dict]]:
    """Every system saves the same state ``repeats`` times; the last save of each is kept."""
    state, _ = build_state(cfg.shape, "save", world, empty=False)
    systems: dict[str, Callable[[dict, str], None]] = {"ckpt": ckpt_save}
    for t in cfg.dcp_threads:
        systems[f"dcp-t{t}"] = dcp_save(t)
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    names = list(systems)
    for i in range(cfg.repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            path = os.path.join(cfg.root, f"{name}-{i}")
            runs[name].append(_run(lambda: systems[name](state, path), False, rank))  # noqa: B023
            dist.barrier()
            if rank == 0 and i > 0:
                shutil.rmtree(os.path.join(cfg.root, f"{name}-{i - 1}"))
    dist.barrier()
    return runs


def load_phase(rank: int, world: int, cfg: Config, layout: str, paths: dict[str, str]) -> dict[str, list[dict]]:
    """Every system loads its checkpoint into ``layout`` on ``world`` ranks, cold and warm."""
    state, expected = build_state(cfg.shape, layout, world, empty=True)
    systems = {"ckpt": ckpt_load, "dcp": dcp_load}
    runs: dict[str, list[dict]] = {f"{n}-{c}": [] for n in systems for c in ("cold", "warm")}
    names = list(systems)
    if not cfg.cold:  # warm only: fill the cache once, untimed
        for name in names:
            systems[name](state, paths[name])
            dist.barrier()
    for i in range(cfg.repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            for cache in ("cold", "warm") if cfg.cold else ("warm",):
                zero_state(state, cfg.shape)
                runs[f"{name}-{cache}"].append(
                    _run(lambda: systems[name](state, paths[name]), cache == "cold", rank)  # noqa: B023
                )
                check_state(state, expected, f"{name} {layout} load (rank {rank})")
    dist.barrier()
    return {k: v for k, v in runs.items() if v}


# --------------------------------------------------------------------------- report


def summarize(runs_by_rank: list[dict[str, list[dict]]]) -> dict[str, dict[str, Any]]:
    """Per system: seconds per repeat (rank 0's barrier-to-barrier time), median,
    and CPU seconds and bytes read/written summed over ranks."""
    out = {}
    for name, runs in runs_by_rank[0].items():
        secs = [r["seconds"] for r in runs]
        cpu = [sum(rr[name][i]["cpu_s"] for rr in runs_by_rank) for i in range(len(runs))]
        io = {
            k: median([sum(rr[name][i]["io"][k] for rr in runs_by_rank) for i in range(len(runs))])
            for k in runs[0]["io"]
        }
        out[name] = {
            "seconds": secs,
            "median_s": median(secs),
            "cpu_s": cpu,
            "median_cpu_s": median(cpu),
            "io_median_bytes": io,
        }
    return out


def du(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="approximate state size (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported (default 3)")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir on the local disk)")
    ap.add_argument("--dcp-threads", default="1,2,4", help="DCP FileSystemWriter thread_count values to try")
    ap.add_argument("--no-cold", action="store_true", help="skip cold-cache loads even where possible")
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="folder for the JSON results")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args(argv)

    shape = ModelShape.for_gib(args.gib)
    nbytes = state_bytes(shape)
    root = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
    cold = not args.no_cold and page_cache_droppable()
    cfg = Config(shape, root, max(1, args.repeats), tuple(int(t) for t in args.dcp_threads.split(",")), cold)
    n_tensors = len(tensor_specs(shape))
    fstype = filesystem_of(root)
    print(
        f"state: {nbytes / 2**30:.3f} GiB in {n_tensors} tensors ({shape}); repeats={cfg.repeats}; "
        f"dir={root} ({fstype}); page cache drop: {'yes' if cold else 'no (warm only)'}",
        flush=True,
    )
    if fstype == "tmpfs":
        print("warning: the checkpoint dir is on tmpfs (RAM): these are not disk figures", flush=True)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "config": {**asdict(cfg), "state_bytes": nbytes, "tensors": n_tensors, "argv": sys.argv, "fs": fstype},
        "phases": {},
    }
    try:
        t0 = time.perf_counter()
        save = summarize(run_ranks(save_phase, 2, cfg))
        dcp_names = [n for n in save if n.startswith("dcp")]
        best_dcp = min(dcp_names, key=lambda n: save[n]["median_s"])
        results["phases"]["save"] = save
        results["disk_bytes"] = {n: du(os.path.join(root, f"{n}-{cfg.repeats - 1}")) for n in save}
        print(f"save phase done in {time.perf_counter() - t0:.0f}s", flush=True)
        paths = {
            "ckpt": os.path.join(root, f"ckpt-{cfg.repeats - 1}"),
            "dcp": os.path.join(root, f"{best_dcp}-{cfg.repeats - 1}"),
        }
        for n in dcp_names:  # keep only the checkpoints the loads read
            if n != best_dcp:
                shutil.rmtree(os.path.join(root, f"{n}-{cfg.repeats - 1}"))
        t0 = time.perf_counter()
        results["phases"]["load"] = summarize(run_ranks(load_phase, 2, cfg, "save", paths))
        print(f"load phase done in {time.perf_counter() - t0:.0f}s", flush=True)
        t0 = time.perf_counter()
        results["phases"]["reshard"] = summarize(run_ranks(load_phase, 3, cfg, "reshard", paths))
        print(f"reshard phase done in {time.perf_counter() - t0:.0f}s", flush=True)
        results["dcp_checkpoint_loaded"] = best_dcp
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    rows, summary = report(results, nbytes, best_dcp)
    results["summary"] = summary
    print()
    print(format_table(["op", "system", "median s", "GiB/s", "runs (s)", "CPU s", "read() GiB", "written GiB"], rows))
    print()
    print(format_table(list(SUMMARY_COLUMNS), [[s[k] for k in SUMMARY_COLUMNS.values()] for s in summary]))
    print(
        "\nspeedup = DCP median s / ckpt median s; paired = median over repeats of the same-repeat ratio;"
        "\nCPU s = user+sys summed over ranks (robust to a busy machine); ckpt verifies xxh3 checksums, DCP does not."
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"save_load-{stamp}.json", "save_load-latest.json"):
        write_json(os.path.join(args.out, name), results)
    print(f"\nresults: {os.path.join(args.out, f'save_load-{stamp}.json')}")
    return 0


SUMMARY_COLUMNS = {
    "op": "op",
    "cache": "cache",
    "ckpt s": "ckpt_s",
    "ckpt GiB/s": "ckpt_gibps",
    "DCP": "dcp",
    "DCP s": "dcp_s",
    "DCP GiB/s": "dcp_gibps",
    "speedup": "speedup",
    "paired": "paired_speedup",
    "ckpt CPU s": "ckpt_cpu_s",
    "DCP CPU s": "dcp_cpu_s",
    "target": "target",
    "met": "met",
}


def report(results: dict[str, Any], nbytes: int, best_dcp: str) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """Rows per system, and one summary line per (op, cache) comparing ckpt with the best DCP."""
    rows, summary = [], []
    for op, phase in results["phases"].items():
        for name, r in phase.items():
            io = r["io_median_bytes"]
            runs = " ".join(f"{s:.2f}" for s in r["seconds"])
            rows.append(
                [op, name, r["median_s"], rate(nbytes, r["median_s"]), runs, r["median_cpu_s"]]
                + [io["rchar"] / 2**30, io["wchar"] / 2**30]
            )
        caches = ["-"] if op == "save" else sorted({n.split("-")[1] for n in phase})
        for cache in caches:
            mine = phase["ckpt"] if op == "save" else phase[f"ckpt-{cache}"]
            theirs = phase[best_dcp if op == "save" else f"dcp-{cache}"]
            speedup = theirs["median_s"] / mine["median_s"]
            paired = median([d / c for c, d in zip(mine["seconds"], theirs["seconds"])])
            summary.append(
                {
                    "op": op,
                    "cache": cache,
                    "ckpt_s": mine["median_s"],
                    "ckpt_gibps": rate(nbytes, mine["median_s"]),
                    "dcp": best_dcp if op == "save" else f"load ({best_dcp} files)",
                    "dcp_s": theirs["median_s"],
                    "dcp_gibps": rate(nbytes, theirs["median_s"]),
                    "speedup": speedup,
                    "paired_speedup": paired,
                    "ckpt_cpu_s": mine["median_cpu_s"],
                    "dcp_cpu_s": theirs["median_cpu_s"],
                    "target": f">= {TARGETS[op]}",
                    "met": "yes" if speedup >= TARGETS[op] else "NO",
                }
            )
    return rows, summary


if __name__ == "__main__":
    sys.exit(main())
