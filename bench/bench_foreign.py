"""Reading a DeepSpeed ZeRO checkpoint into a reshardable form: ``ckpt convert`` (in place) vs ``ds_to_universal``.

Method: DeepSpeed (CPU, 2 gloo ranks, ZeRO 2, fp32 AdamW) trains one step of a
TiedNet of about ``--width``/``--depth`` and saves it. Then, each in a fresh
process on the same warm checkpoint: ``ckpt convert <ds dir> <out>`` (one pass,
reads each parameter's regions from the rank files), ``ckpt.load`` of the DeepSpeed
directory straight into full tensors (what resharding needs; no output), and DeepSpeed's
``ds_to_universal --inject_missing_state`` (extracts every ZeRO fragment into a
temporary folder, merges them per parameter, writes the universal checkpoint;
``--keep_temp_folder`` so its size can be measured). Reported: wall time, peak
RSS of the process tree (RUSAGE_CHILDREN of a wrapper), bytes written besides
the output (temporary) and the output's size. Times run until the output is on disk
(``sync`` before each tool, untimed, and after it, timed): ckpt fsyncs its output,
ds_to_universal does not, and without the second sync it would leave its writeback to
whatever runs next. Each tool runs ``--repeats`` times, the order rotating between rounds
(on a VM, whichever writes first may pay for memory the guest never touched before), and the
median run is reported with the range.

Run: ``python bench/bench_foreign.py [--depth 12]`` (needs the ``test`` extra: deepspeed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

WRAP = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
)


# ckpt.load straight from the DeepSpeed directory into full tensors (RSS includes those targets)
LOAD = (
    "import sys, torch, ckpt; from ckpt.interop import open_source\n"
    "with open_source(sys.argv[1]) as s: shapes = s.tensors()\n"
    "state = {k: torch.empty(i.shape, dtype=i.dtype) for k, i in shapes.items()}\n"
    "ckpt.load(state, sys.argv[1], strict=False)"
)


def _save(rank: int, world: int, out: str, width: int, vocab: int, depth: int) -> int:
    import torch
    from ds_train import TiedNet, _setup_deepspeed, make_engine

    deepspeed = _setup_deepspeed(rank, world)
    torch.manual_seed(0)
    engine = make_engine(deepspeed, 2, False, False, TiedNet(width, vocab, depth))
    ids = torch.randint(0, vocab, (2, 4))
    engine.backward(engine(ids))
    engine.step()
    engine.save_checkpoint(out, tag="global_step1")
    return sum(p.numel() for p in engine.module.parameters())


def _du(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return total


def _timed(cmd: list[str]) -> tuple[float, int]:
    """Wall time until ``cmd``'s output is on disk, and its peak RSS. Dirty pages of whatever ran
    before are flushed first (untimed); the flush after is timed, since ckpt fsyncs what it writes
    and ds_to_universal leaves it in the page cache: both are measured to durable output."""
    os.sync()
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True, check=True)
    os.sync()
    rss_kib, rc = out.stdout.split()[-2:]
    if rc != "0":
        raise RuntimeError(f"{cmd} failed: {out.stderr[-2000:]}")
    return time.perf_counter() - t, int(rss_kib) << 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each tool (the median is reported)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    from dist import run_ranks

    work = args.dir or tempfile.mkdtemp(prefix="bench-foreign-")
    src = os.path.join(work, "ds")
    try:
        if not os.path.exists(os.path.join(src, "latest")):  # a --dir of an earlier run keeps its checkpoint
            t = time.perf_counter()
            params = run_ranks(_save, 2, src, args.width, args.vocab, args.depth, timeout=1800)[0]
            print(f"saved {params / 1e6:.1f} M params in {time.perf_counter() - t:.0f} s")
        print(f"DeepSpeed ZeRO-2 checkpoint: {_du(src) / 2**30:.2f} GiB", flush=True)
        env_src = os.path.join(src, "global_step1")
        out, uni = os.path.join(work, "ckpt"), os.path.join(work, "universal")
        tools = {
            "ckpt convert": [sys.executable, "-m", "ckpt.cli", "convert", src, out],
            "ckpt.load (no output)": [sys.executable, "-c", LOAD, src],
            "ds_to_universal": [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                env_src, "--output_folder", uni, "--inject_missing_state", "--keep_temp_folder"],
        }
        runs: dict[str, list[tuple[float, int, int, int]]] = {name: [] for name in tools}
        names = list(tools)
        for r in range(args.repeats):  # the order rotates: no tool always runs first (or last)
            for name in names[r % len(names):] + names[: r % len(names)]:
                for old in (out, uni):
                    shutil.rmtree(old, ignore_errors=True)
                secs, rss = _timed(tools[name])
                temp = _du(os.path.join(uni, "tmp")) if name == "ds_to_universal" else 0  # --keep_temp_folder
                written = _du(uni) - temp if name == "ds_to_universal" else _du(out) if name == "ckpt convert" else 0
                runs[name].append((secs, rss, temp, written))
        results = {name: sorted(rs)[len(rs) // 2] for name, rs in runs.items()}  # the median run
        spread = {name: (min(r[0] for r in rs), max(r[0] for r in rs)) for name, rs in runs.items()}
        print(f"median of {args.repeats} runs each, order rotating")
        print(f"{'tool':<24}{'seconds':>9}{'min-max':>14}{'peak RSS GiB':>14}{'temp GiB':>10}{'output GiB':>12}")
        for name, (s, r, tmpb, outb) in results.items():
            lo, hi = spread[name]
            print(f"{name:<24}{s:>9.1f}{f'{lo:.1f}-{hi:.1f}':>14}{r / 2**30:>14.2f}{tmpb / 2**30:>10.2f}"
                  f"{outb / 2**30:>12.2f}")
        for name in ("ckpt convert", "ckpt.load (no output)"):
            print(f"{name} is {results['ds_to_universal'][0] / results[name][0]:.1f}x faster than ds_to_universal")
        print(json.dumps({k: dict(zip(("s", "rss", "temp", "out"), v)) for k, v in results.items()}))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
