"""Run a function on N CPU ranks (gloo), each in its own process.

Tests and benchmarks (through bench/common.py) use this instead of torchrun:
it needs no free port (a FileStore in a temp dir), propagates each rank's
exception with its traceback, and kills the whole group if one rank hangs or dies.

``start_method="forkserver"`` forks ranks from a server that has already
imported torch and ckpt: a rank then starts in ~10 ms instead of the ~3 s a
spawned interpreter spends importing torch (which dominates multi-process tests
on a 2-core machine). Ranks still get a fresh, unused interpreter state and the
parent's current environment variables, as with "spawn".
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

# Imported once by the fork server (torch._dynamo: FSDP2's fully_shard imports it lazily, ~1.5 s per rank).
FORKSERVER_PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.tensor",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint.state_dict",
    "torch._dynamo",
    "ckpt",
]


@dataclass
class RankOutcome:
    """What became of one rank: ``ok`` (value is its result), ``error`` (value is
    the traceback text), ``died`` (exited without reporting, e.g. SIGKILL: see
    exitcode) or ``hung`` (still running at the timeout; it was killed)."""

    rank: int
    status: str
    value: Any = None
    exitcode: int | None = None


def _entry(fn: Callable, rank: int, world: int, store_path: str, args: tuple, out: Any, env: dict | None) -> None:
    if env is not None:  # forkserver children inherit the server's environment, not the parent's
        os.environ.clear()
        os.environ.update(env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        # Plain pickle, not the queue's: torch's queue pickler would pass tensors as shared-memory
        # file descriptors, which are gone once this process exits before the parent reads them.
        out.put((rank, "ok", pickle.dumps(fn(rank, world, *args), protocol=pickle.HIGHEST_PROTOCOL)))
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _context(start_method: str):
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # no effect once the server runs
    return ctx


def _run(
    fn: Callable, world: int, args: tuple, timeout: float, start_method: str, fail_fast: bool
) -> list[RankOutcome]:
    ctx = _context(start_method)
    out = ctx.Queue()
    env = dict(os.environ) if start_method != "spawn" else None
    outcomes: dict[int, RankOutcome] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, store, args, out, env)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        dead_since: dict[int, float] = {}
        try:
            while len(outcomes) < world:
                if fail_fast and any(o.status != "ok" for o in outcomes.values()):
                    break
                try:
                    rank, status, value = out.get(timeout=0.05)
                    outcomes[rank] = RankOutcome(rank, status, pickle.loads(value) if status == "ok" else value)
                    continue
                except queue.Empty:
                    pass
                now = time.monotonic()
                for r, p in enumerate(procs):
                    if r in outcomes or p.exitcode is None:
                        continue
                    # A rank that reported just before exiting has its result in the pipe already:
                    # give the queue a moment before declaring it dead.
                    if now - dead_since.setdefault(r, now) > 1.0:
                        outcomes[r] = RankOutcome(r, "died", exitcode=p.exitcode)
                if now > deadline:
                    for r in range(world):
                        if r not in outcomes:
                            outcomes[r] = RankOutcome(r, "hung")
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if all(o.status == "ok" for o in outcomes.values()) else 1)
                if p.is_alive():
                    p.kill()
                    p.join()
        for r, p in enumerate(procs):
            if r in outcomes:
                outcomes[r].exitcode = p.exitcode
    return [outcomes[r] for r in sorted(outcomes)]


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 300.0, start_method: str = "spawn") -> list[Any]:
    """Call ``fn(rank, world, *args)`` on ``world`` ranks; return their results by rank.

    ``fn`` must be importable (module level) and its results picklable. The
    first rank that raises or dies fails the call (AssertionError with its
    traceback) and the others are killed.
    """
    outcomes = _run(fn, world, args, timeout, start_method, fail_fast=True)
    bad = [o for o in outcomes if o.status != "ok"]
    if bad or len(outcomes) < world:
        raise AssertionError("\n".join(_describe(o) for o in bad) or "ranks did not report")
    return [o.value for o in outcomes]


def run_ranks_outcomes(
    fn: Callable, world: int, *args: Any, timeout: float = 300.0, start_method: str = "spawn"
) -> list[RankOutcome]:
    """Like :func:`run_ranks`, but for runs where ranks are expected to fail:
    waits for every rank (up to ``timeout``) and returns each one's outcome
    instead of raising. Ranks that outlive the timeout are killed and reported
    ``hung``."""
    outcomes = _run(fn, world, args, timeout, start_method, fail_fast=False)
    return outcomes


def _describe(o: RankOutcome) -> str:
    if o.status == "error":
        return f"rank {o.rank}:\n{o.value}"
    if o.status == "died":
        return f"rank {o.rank}: died with exit code {o.exitcode}"
    return f"rank {o.rank}: {o.status}"
