"""``python -m ckpt.demo`` (``make demo``): save a sharded training state, reshard it on load.

A transformer-shaped model's state (parameters, AdamW moments and step
counters, training counters, per-rank RNG states) is saved by 2 CPU ranks with
FSDP-style ``Shard(0)`` DTensors, then loaded by 3 ranks laid out for tensor
parallelism (column-parallel ``Shard(0)``, row-parallel ``Shard(1)``, norms
replicated) and by 1 process into plain tensors. Every loaded byte is compared
with the saved reference; the report shows sizes, times, and how many bytes
(in how many requests) each loading rank asks storage for.

The ranks are spawned processes on gloo, rendezvousing through a FileStore in
a temp dir and bound to loopback: nothing to start, no ports to pick.

The pieces (model spec, layouts, reference values, state builders, rank
launcher, phases) are separate so the demo can grow into a
train/kill/resume/merge story.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import ckpt
from ckpt.describe import flatten
from ckpt.format import FORMAT_VERSION, itemsize
from ckpt.reader import CheckpointReader
from ckpt.readplan import ReadSettings, intersect_chunks, plan_reads

Shape = tuple[int, ...]
MOMENTS = ("exp_avg", "exp_avg_sq")


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and topology of one demo run (defaults: ~13 M params, ~155 MiB of state)."""

    vocab: int = 8192
    dim: int = 384
    layers: int = 4
    hidden: int = 1536
    step: int = 100
    seed: int = 0
    save_world: int = 2
    load_world: int = 3
    timeout_s: float = 180.0


def param_shapes(cfg: DemoConfig) -> dict[str, Shape]:
    """Parameter names and global shapes of a pre-norm decoder-only transformer."""
    d, h = cfg.dim, cfg.hidden
    shapes: dict[str, Shape] = {"embed.weight": (cfg.vocab, d)}
    for i in range(cfg.layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "attn.qkv.weight"] = (3 * d, d)
        shapes[p + "attn.out.weight"] = (d, d)
        shapes[p + "mlp_norm.weight"] = (d,)
        shapes[p + "mlp.up.weight"] = (h, d)
        shapes[p + "mlp.down.weight"] = (d, h)
    shapes["norm.weight"] = (d,)
    shapes["head.weight"] = (cfg.vocab, d)
    return shapes


def reference(cfg: DemoConfig, name: str, kind: str) -> torch.Tensor:
    """The saved value of a parameter (kind "param") or one of its AdamW moments.

    Deterministic in (seed, name, kind), so every process can rebuild what any
    other one saved without communicating.
    """
    shape = param_shapes(cfg)[name]
    g = torch.Generator().manual_seed((cfg.seed << 32) ^ zlib.crc32(f"{name}/{kind}".encode()))
    x = torch.randn(shape, generator=g)
    if kind == "param":
        return x.mul_(0.02)
    if kind == "exp_avg":
        return x.mul_(1e-3)
    return x.square_().mul_(1e-6)


def reference_rng(cfg: DemoConfig, rank: int) -> torch.Tensor:
    """The CPU RNG state rank ``rank`` of the saving job had (seeded per rank)."""
    return torch.Generator().manual_seed(cfg.seed * 1000 + rank).get_state()


def json_state(cfg: DemoConfig, blank: bool = False) -> dict[str, Any]:
    """The non-tensor part of the state (stored as JSON); ``blank`` gives load targets."""
    step = 0 if blank else cfg.step
    group = {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "params": sorted(param_shapes(cfg))}
    return {
        "param_groups": [] if blank else [group],
        "train": {"step": step, "tokens_seen": step * 8 * 1024, "data": {"epoch": 0, "next_index": step * 8}},
    }


# --- layouts: where each rank's shard sits -------------------------------------------------------

Layout = Callable[[str], Sequence[Placement]]


def fsdp_layout(name: str) -> Sequence[Placement]:
    """FSDP2-style: every parameter and its optimizer state split along dim 0."""
    return (Shard(0),)


def tp_layout(name: str) -> Sequence[Placement]:
    """Megatron-style tensor parallelism: column-parallel weights (and the
    vocab-parallel embedding/head) split along dim 0, row-parallel along dim 1,
    norms replicated."""
    if name.endswith("norm.weight"):
        return (Replicate(),)
    if name.endswith(("attn.out.weight", "mlp.down.weight")):
        return (Shard(1),)
    return (Shard(0),)


LAYOUTS: dict[str, tuple[Layout, str]] = {
    "fsdp": (fsdp_layout, "FSDP-style Shard(0)"),
    "tp": (tp_layout, "TP-style Shard(0)/Shard(1)/Replicate"),
}


@dataclass
class Leaf:
    """One tensor of a built state: its key, what it holds, and where its local part sits."""

    key: str
    name: str  # parameter name, or "rng"
    kind: str  # "param", a moment, "step" or "rng"
    local: torch.Tensor
    offsets: Shape  # of ``local`` inside the global tensor

    def expected(self, cfg: DemoConfig) -> torch.Tensor:
        if self.kind == "rng":
            full = torch.stack([reference_rng(cfg, r) for r in range(cfg.save_world)])
        elif self.kind == "step":
            full = torch.tensor(float(cfg.step))
        else:
            full = reference(cfg, self.name, self.kind)
        return full[tuple(slice(o, o + s) for o, s in zip(self.offsets, self.local.shape))]


def build_state(
    cfg: DemoConfig, mesh: DeviceMesh | None, layout: Layout | None, fill: bool, rank: int = 0
) -> tuple[dict[str, Any], list[Leaf]]:
    """A state dict as ``get_state_dict`` shapes it (model / optim / train / rng).

    With ``mesh`` and ``layout`` the parameters and moments are DTensors, else
    plain tensors. ``fill`` puts the reference values in (to save); otherwise
    tensors are zeros and JSON values blank (load targets). The saving job's
    per-rank RNG states form one (save_world, n) tensor; each saving rank holds
    its row as a ``ckpt.Sharded`` box, loaders read the whole table.
    """
    leaves: list[Leaf] = []

    def tensor(key: str, name: str, kind: str) -> torch.Tensor:
        shape = param_shapes(cfg)[name]
        if mesh is None or layout is None:
            local_shape, offsets = shape, (0,) * len(shape)
        else:
            local_shape, offsets = compute_local_shape_and_global_offset(shape, mesh, layout(name))
        leaf = Leaf(key, name, kind, torch.zeros(local_shape), tuple(offsets))
        if fill:
            leaf.local = leaf.expected(cfg).clone()
        leaves.append(leaf)
        if mesh is None or layout is None:
            return leaf.local
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            leaf.local, mesh, layout(name), run_check=False, shape=torch.Size(shape), stride=stride
        )

    model, state = {}, {}
    for name in param_shapes(cfg):
        model[name] = tensor(f"model.{name}", name, "param")
        state[name] = {m: tensor(f"optim.state.{name}.{m}", name, m) for m in MOMENTS}
        step = torch.tensor(float(cfg.step if fill else 0))
        leaves.append(Leaf(f"optim.state.{name}.step", name, "step", step, ()))
        state[name]["step"] = step
    values = json_state(cfg, blank=not fill)

    rng_len = reference_rng(cfg, 0).numel()
    table_shape = (cfg.save_world, rng_len)
    if fill:
        own = reference_rng(cfg, rank).unsqueeze(0)
        leaves.append(Leaf("rng.torch_cpu", "rng", "rng", own, (rank, 0)))
        rng: Any = ckpt.Sharded.box(own, table_shape, (rank, 0))
    else:
        rng = torch.zeros(table_shape, dtype=torch.uint8)
        leaves.append(Leaf("rng.torch_cpu", "rng", "rng", rng, (0, 0)))
    sd = {
        "model": model,
        "optim": {"state": state, "param_groups": values["param_groups"]},
        "train": values["train"],
        "rng": {"torch_cpu": rng},
    }
    return sd, leaves


# --- verification ----------------------------------------------------------------------------------


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike ``torch.equal``: NaN payloads and -0.0 count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def check_state(cfg: DemoConfig, sd: dict[str, Any], leaves: list[Leaf]) -> list[str]:
    """Every difference between a loaded state and the saved reference, by key."""
    problems = []
    for leaf in leaves:
        want = leaf.expected(cfg)
        if not bitwise_equal(leaf.local, want):
            diff = "shape/dtype" if leaf.local.shape != want.shape or leaf.local.dtype != want.dtype else "bytes"
            problems.append(f"{leaf.key}: {diff} differ from what was saved (local part at {list(leaf.offsets)})")
    want_values = json_state(cfg)
    got_values = {"param_groups": sd["optim"]["param_groups"], "train": sd["train"]}
    for k in want_values:
        if got_values[k] != want_values[k]:
            problems.append(f"{k}: JSON value {got_values[k]!r} != saved {want_values[k]!r}")
    return problems


def planned_reads(manifest: ckpt.Manifest, sd: dict[str, Any], options: ckpt.LoadOptions) -> tuple[int, int]:
    """(bytes, requests) that ``ckpt.load(sd, ...)`` asks storage for on this rank.

    Computed with the loader's own planner (``ckpt.readplan``) on this rank's
    target pieces, so it holds whatever the backend (``preadv``, a memory
    mapping, ranged GETs) and whatever the page cache, which syscall counters
    cannot tell apart.
    """
    tensors, _, _ = flatten(sd)
    needs = []
    for key, entry in tensors.items():
        rec = manifest.tensors[key]
        for i, piece in enumerate(entry.pieces):
            got, _ = intersect_chunks(key, i, piece.box, rec.chunks, itemsize(rec.dtype), options.max_gap_bytes)
            needs.extend(got)
    settings = ReadSettings(manifest.block_bytes, options.verify, options.max_gap_bytes, options.max_read_bytes)
    reads = plan_reads(needs, settings, direct_ok=lambda n: False)  # direct or not, the same byte ranges
    return sum(r.stop - r.start for r in reads), len(reads)


# --- spawning CPU ranks ------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, tmp: str, fn: Callable, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # rank-to-rank traffic stays on loopback
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        with open(f"{tmp}/result-{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable, world: int, *args: Any, timeout_s: float = 180.0) -> list[dict]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo CPU ranks; return their JSON results.

    A rank's exception is re-raised here with its traceback (the others are
    stopped); a run past ``timeout_s`` is killed.
    """
    # Ranks fork from a server process that has imported torch once (and
    # torch._dynamo, which DTensor.from_local imports lazily): starting a rank
    # then takes milliseconds instead of a fresh interpreter's seconds.
    multiprocessing.get_context("forkserver").set_forkserver_preload([__name__, "torch._dynamo"])
    with tempfile.TemporaryDirectory(prefix="ckpt-demo-ranks-") as tmp:
        ctx = torch.multiprocessing.start_processes(
            _rank_main, args=(world, tmp, fn, args), nprocs=world, join=False, start_method="forkserver"
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {timeout_s:.0f}s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        results = []
        for r in range(world):
            with open(f"{tmp}/result-{r}.json") as f:
                results.append(json.load(f))
        return results


# --- the phases ---------------------------------------------------------------------------------------


def save_rank(rank: int, world: int, cfg: DemoConfig, uri: str, layout: str, overwrite: bool) -> dict:
    """One saving rank: build its shards of the state, save, time it."""
    mesh = init_device_mesh("cpu", (world,))
    sd, _ = build_state(cfg, mesh, LAYOUTS[layout][0], fill=True, rank=rank)
    opts = ckpt.SaveOptions(overwrite=overwrite, commit_timeout_s=cfg.timeout_s / 2)
    dist.barrier()
    t0 = time.perf_counter()
    save_id = ckpt.save(sd, uri, step=cfg.step, metrics={"loss": 2.31}, metadata={"demo": layout}, options=opts)
    seconds = time.perf_counter() - t0
    return {"rank": rank, "seconds": seconds, "save_id": save_id}


def load_rank(rank: int, world: int, cfg: DemoConfig, uri: str, layout: str | None) -> dict:
    """One loading rank (or the single process when ``layout`` is None): load, verify, count bytes read."""
    mesh = init_device_mesh("cpu", (world,)) if layout else None
    sd, leaves = build_state(cfg, mesh, LAYOUTS[layout][0] if layout else None, fill=False)
    local_bytes = sum(leaf.local.numel() * leaf.local.element_size() for leaf in leaves)
    options = ckpt.LoadOptions()
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    manifest = ckpt.load(sd, uri, options=options)
    seconds = time.perf_counter() - t0
    read_bytes, requests = planned_reads(manifest, sd, options)
    return {
        "rank": rank,
        "seconds": seconds,
        "local_bytes": local_bytes,
        "read_bytes": read_bytes,
        "requests": requests,
        "problems": check_state(cfg, sd, leaves),
        "save_id": manifest.save_id,
    }


@dataclass
class Phase:
    """One save or load across ranks, as the report shows it."""

    what: str  # "save" or "load"
    world: int
    layout: str
    ranks: list[dict]

    @property
    def seconds(self) -> float:
        return max(r["seconds"] for r in self.ranks)

    @property
    def problems(self) -> list[str]:
        return [f"rank {r['rank']}: {p}" for r in self.ranks for p in r.get("problems", [])]


@dataclass
class DemoResult:
    cfg: DemoConfig
    uri: str
    manifest: ckpt.Manifest
    checkpoint_bytes: int  # data objects + manifest
    phases: list[Phase] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        return sum(r.nbytes for r in self.manifest.tensors.values())

    @property
    def verified(self) -> bool:
        loads = [p for p in self.phases if p.what == "load"]
        return bool(loads) and not any(p.problems for p in loads)


def run_demo(cfg: DemoConfig, directory: str | None = None, overwrite: bool = False) -> DemoResult:
    """Save on ``cfg.save_world`` ranks (FSDP layout), load on ``cfg.load_world`` ranks
    (TP layout) and in this process (plain tensors); return what happened.

    The checkpoint goes to ``<directory>/step-NNNNNN``, or to a temp dir that is
    removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="ckpt-demo-") as tmp:
        uri = os.path.join(directory or tmp, f"step-{cfg.step:06d}")
        t = cfg.timeout_s
        phases = [
            Phase(
                "save",
                cfg.save_world,
                "fsdp",
                spawn_ranks(save_rank, cfg.save_world, cfg, uri, "fsdp", overwrite, timeout_s=t),
            ),
            Phase("load", cfg.load_world, "tp", spawn_ranks(load_rank, cfg.load_world, cfg, uri, "tp", timeout_s=t)),
            Phase("load", 1, "plain", [load_rank(0, 1, cfg, uri, None)]),
        ]
        manifest = CheckpointReader(uri).manifest
        size = sum(manifest.objects.values()) + os.path.getsize(os.path.join(uri, "manifest.json"))
        return DemoResult(cfg, uri if directory else "", manifest, size, phases)


# --- the report -----------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def report(res: DemoResult) -> str:
    """A short, readable account of the run."""
    cfg, m = res.cfg, res.manifest
    shapes = param_shapes(cfg)
    n_params = sum(math.prod(s) for s in shapes.values())
    chunks = sum(len(r.chunks) for r in m.tensors.values())
    lines = [
        f"ckpt demo: transformer-shaped state, {cfg.layers} layer{'s' if cfg.layers > 1 else ''}, "
        f"dim {cfg.dim}, vocab {cfg.vocab}: "
        f"{n_params / 1e6:.1f} M params (fp32) + AdamW moments + step counters + RNG",
        f"  state   {_size(res.tensor_bytes)} in {len(m.tensors)} tensors and {len(m.values)} JSON values",
        f"  stored  {_size(res.checkpoint_bytes)}: {len(m.objects)} data objects + manifest "
        f"({_size(res.checkpoint_bytes - sum(m.objects.values()))}) at {res.uri or '(a temp dir, removed)'}",
        "",
    ]
    for p in res.phases:
        ranks = f"{p.world} rank{'s' if p.world > 1 else ' '}"
        label = LAYOUTS[p.layout][1] if p.layout in LAYOUTS else "plain tensors"
        ok = "" if p.what == "save" else ("  bitwise equal" if not p.problems else f"  {len(p.problems)} MISMATCHES")
        lines.append(
            f"  {p.what}  {ranks}  {label:<38} {p.seconds:6.2f} s  {_size(res.tensor_bytes / p.seconds):>10}/s{ok}"
        )
        if p.what == "load":
            for r in p.ranks:
                share = r["read_bytes"] / res.tensor_bytes
                lines.append(
                    f"          rank {r['rank']}: holds {_size(r['local_bytes']):>10}, reads "
                    f"{_size(r['read_bytes']):>10} = {share:4.0%} of the stored tensors, in {r['requests']} requests"
                )
        lines.extend(f"          {problem}" for problem in p.problems[:10])
        if p.what == "load" and p.world > 1:
            lines.append(
                f"          (reads are whole {m.block_bytes >> 10} KiB checksum blocks and run through gaps of up to "
                "1 MiB, so a shard that cuts across stored chunks costs more than its own bytes)"
            )
    topo = m.topology
    lines += [
        "",
        f"  manifest  format ckpt v{FORMAT_VERSION}, save_id {m.save_id}, step {m.step}, "
        f"metrics {m.metrics}, created {m.created}",
        f"            {len(m.tensors)} tensors in {chunks} chunks, {m.block_bytes >> 10} KiB xxh3-64 checksum blocks, "
        f"saved from world {topo.get('world_size')} ({topo.get('backend')}), "
        f"bytes written per rank {[_size(b) for b in topo.get('bytes_written_per_rank', [])]}",
        "  (load times are from a warm page cache: the checkpoint was just written)",
        *([f"  inspect it: .venv/bin/ckpt info {res.uri}   |   .venv/bin/ckpt verify {res.uri}"] if res.uri else []),
        "",
        "verified: every loaded tensor and value is bitwise equal to what was saved"
        if res.verified
        else "NOT VERIFIED: see the mismatches above",
    ]
    return "\n".join(lines)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the demo, print the report; exit status 0 only if verified."""
    ap = argparse.ArgumentParser(
        prog="python -m ckpt.demo",
        description="Save a sharded training state on CPU ranks, load it back under other layouts, verify bitwise.",
    )
    ap.add_argument("--dir", help="keep the checkpoint under DIR/step-NNNNNN (default: a temp dir, removed)")
    ap.add_argument("--overwrite", action="store_true", help="replace a checkpoint left in --dir by an earlier run")
    ap.add_argument("--layers", type=_positive, default=DemoConfig.layers, help="transformer layers (%(default)s)")
    ap.add_argument("--dim", type=_positive, default=DemoConfig.dim, help="model width; MLP is 4x (%(default)s)")
    ap.add_argument("--vocab", type=_positive, default=DemoConfig.vocab, help="vocabulary size (%(default)s)")
    ap.add_argument("--save-world", type=_positive, default=DemoConfig.save_world, help="saving ranks (%(default)s)")
    ap.add_argument("--load-world", type=_positive, default=DemoConfig.load_world, help="loading ranks (%(default)s)")
    ap.add_argument("--seed", type=int, default=DemoConfig.seed, help="seed of the saved values (%(default)s)")
    args = ap.parse_args(argv)
    cfg = DemoConfig(
        vocab=args.vocab,
        dim=args.dim,
        layers=args.layers,
        hidden=4 * args.dim,
        seed=args.seed,
        save_world=args.save_world,
        load_world=args.load_world,
    )
    torch.set_num_threads(1)
    res = run_demo(cfg, args.dir, args.overwrite)
    print(report(res))
    return 0 if res.verified else 1


if __name__ == "__main__":
    # Ranks must find their functions by name: run the importable module's main, and
    # let multiprocessing prepare ranks from this file's path rather than by re-running
    # `-m ckpt.demo` over the preloaded module (which runpy warns about).
    __spec__ = None
    from ckpt.demo import main as _main

    sys.exit(_main())
