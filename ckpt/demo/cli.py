"""The demo's command line: sizes and topology as options, the report on stdout."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..cli.common import positive_int
from .model import ModelConfig
from .report import report
from .story import DemoConfig, run_demo


def process_age() -> float:
    """Seconds since this process started (0.0 where /proc cannot tell)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def parser() -> argparse.ArgumentParser:
    d, m = DemoConfig(), ModelConfig()
    ap = argparse.ArgumentParser(
        prog="python -m ckpt.demo",
        description="Train a small transformer on CPU ranks with periodic async saves through a ckpt-server "
        "daemon, SIGKILL it mid-save, resume on another number of ranks, merge the last checkpoints, report.",
    )
    ap.add_argument("--dir", help="keep checkpoints, merge, events and daemon log under DIR (default: a temp dir)")
    ap.add_argument("--overwrite", action="store_true", help="replace what an earlier demo left in --dir")
    g = ap.add_argument_group("run")
    g.add_argument("--steps", type=positive_int, default=d.steps, help="total training steps (%(default)s)")
    g.add_argument("--every", type=positive_int, default=d.every, help="save every N steps (%(default)s)")
    g.add_argument(
        "--kill-at", type=positive_int, default=d.kill_at, help="SIGKILL right after this step's save (%(default)s)"
    )
    g.add_argument(
        "--train-world", type=positive_int, default=d.train_world, help="ranks before the kill (%(default)s)"
    )
    g.add_argument("--resume-world", type=positive_int, default=d.resume_world, help="ranks after it (%(default)s)")
    g.add_argument("--keep-last", type=positive_int, default=d.keep_last, help="checkpoints retained (%(default)s)")
    g.add_argument("--merge-last", type=positive_int, default=d.merge_last, help="checkpoints merged (%(default)s)")
    g.add_argument("--merge-method", choices=("mwa", "uniform"), default=d.merge_method, help="(%(default)s)")
    g.add_argument("--reference", action="store_true", help="also run uninterrupted and compare the losses")
    g = ap.add_argument_group("model")
    g.add_argument("--layers", type=positive_int, default=m.layers, help="transformer blocks (%(default)s)")
    g.add_argument("--dim", type=positive_int, default=m.dim, help="width; the MLP is 4x (%(default)s)")
    g.add_argument("--heads", type=positive_int, default=m.heads, help="attention heads (%(default)s)")
    g.add_argument("--vocab", type=positive_int, default=m.vocab, help="vocabulary (%(default)s)")
    g.add_argument("--seq", type=positive_int, default=m.seq, help="tokens per sequence (%(default)s)")
    g.add_argument(
        "--batch", type=positive_int, default=m.batch, help="sequences per step, split over ranks (%(default)s)"
    )
    g.add_argument("--seed", type=int, default=m.seed, help="initial weights and data (%(default)s)")
    return ap


def parse(argv: Sequence[str] | None = None) -> tuple[DemoConfig, argparse.Namespace]:
    """The run's configuration from the command line (exits with status 2 on a bad one)."""
    ap = parser()
    a = ap.parse_args(argv)
    model = ModelConfig(vocab=a.vocab, dim=a.dim, layers=a.layers, heads=a.heads, seq=a.seq, batch=a.batch, seed=a.seed)
    cfg = DemoConfig(
        model=model,
        steps=a.steps,
        every=a.every,
        kill_at=a.kill_at,
        keep_last=a.keep_last,
        train_world=a.train_world,
        resume_world=a.resume_world,
        merge_last=a.merge_last,
        merge_method=a.merge_method,
        reference=a.reference,
    )
    try:
        cfg.check()
    except ValueError as e:
        ap.error(str(e))
    return cfg, a


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo and print the report; exit status 0 only if the story's invariants hold."""
    cfg, a = parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    startup = process_age()
    res = run_demo(cfg, a.dir, a.overwrite)
    res.startup_s = startup
    print(report(res))
    return 0 if res.ok else 1
