"""Run a function on N CPU ranks (gloo), each in its own spawned process.

Tests use this instead of torchrun: it needs no free port (a FileStore in a
temp dir), propagates each rank's exception with its traceback, and kills the
whole group if one rank hangs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def _entry(fn: Callable, rank: int, world: int, store_path: str, args: tuple, out: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        out.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Call ``fn(rank, world, *args)`` on ``world`` ranks; return their results by rank.

    ``fn`` must be importable (module level) and its results picklable.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, store, args, out)) for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: list[str] = []
        try:
            for _ in range(world):
                rank, status, value = out.get(timeout=timeout)
                if status == "ok":
                    results[rank] = value
                else:
                    errors.append(f"rank {rank}:\n{value}")
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 1)
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            raise AssertionError("\n".join(errors))
        return [results[r] for r in range(world)]
