"""Restore time of ~1 GiB on 2 ranks: from the daemon's RAM tier, local disk, and S3.

One node-local ckpt-server persists a Manager's checkpoint to local disk
(and mirrors it into its RAM tier); the same state is also saved to a
SeaweedFS S3 server on loopback. Fresh ranks then ``Manager.restore`` it three
ways, and the page cache is dropped before the disk and S3 restores when this
machine allows it (otherwise "warm" is reported).

    .venv/bin/python bench/bench_restore.py --gib 1 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

from common import drop_page_cache, format_table, gib, median, run_ranks, timed_collective  # noqa: E402

import ckpt  # noqa: E402
from ckpt.options import LoadOptions  # noqa: E402


def state(rank: int, world: int, nbytes: int) -> dict:
    """This rank's part of the state (fp32, its own keys), deterministic."""
    rows = nbytes // 4 // 4096 // world // 8
    g = torch.Generator().manual_seed(rank)
    return {
        "model": {f"r{rank}.w{i}": torch.randn(rows, 4096, generator=g) for i in range(4)},
        "optim": {f"r{rank}.m{i}": torch.randn(rows, 4096, generator=g) for i in range(4)},
        "step": 10,
    }


def blank(rank: int, world: int, nbytes: int) -> dict:
    sd = state(rank, world, nbytes)
    for part in ("model", "optim"):
        for t in sd[part].values():
            t.zero_()
    return sd


def save_rank(rank: int, world: int, nbytes: int, local_root: str, daemon: str, s3_root: str, s3_opts: dict) -> None:
    sd = state(rank, world, nbytes)
    mgr = ckpt.Manager(local_root, save_options=ckpt.SaveOptions(daemon=daemon), handle_sigterm=False)
    mgr.save(10, sd).wait()
    mgr.close()
    ckpt.save(sd, f"{s3_root}/step-00000010", options=ckpt.SaveOptions(storage_options=s3_opts))


def restore_rank(
    rank: int, world: int, nbytes: int, root: str, options: dict, storage_options: dict, drop: bool
) -> float:
    import torch.distributed as dist

    sd = blank(rank, world, nbytes)
    if drop and rank == 0:
        drop_page_cache()
    dist.barrier()
    mgr = ckpt.Manager(
        root, storage_options=storage_options, load_options=LoadOptions(strict=False, **options), handle_sigterm=False
    )
    seconds = timed_collective(lambda: mgr.restore(sd))
    mgr.close()
    expect = state(rank, world, nbytes)
    assert all(torch.equal(sd["model"][n], t) for n, t in expect["model"].items()), "restore differs"
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    nbytes = int(args.gib * (1 << 30))
    work = args.dir or tempfile.mkdtemp(prefix="bench-restore-")
    from seaweed import SeaweedFS

    sock = os.path.join(work, "daemon.sock")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ckpt_server.main", "--socket", sock], stderr=open(os.path.join(work, "daemon.log"), "w")
    )
    s3 = SeaweedFS().start()
    try:
        while not os.path.exists(sock):
            time.sleep(0.1)
        address = f"unix://{sock}"
        bucket = s3.make_bucket()
        s3_root, s3_opts = f"s3://{bucket}/run", s3.storage_options()
        local_root = os.path.join(work, "run")
        run_ranks(save_rank, 2, nbytes, local_root, address, s3_root, s3_opts)
        dropped = drop_page_cache()
        ways = {
            "RAM tier (daemon)": (local_root, {"daemon": address}, {}, False),
            "local disk": (local_root, {"daemon": None}, {}, True),
            "S3 (SeaweedFS, loopback)": (s3_root, {"daemon": None}, s3_opts, True),
        }
        rows = []
        for name, (root, options, storage_options, drop) in ways.items():
            times = [
                max(run_ranks(restore_rank, 2, nbytes, root, options, storage_options, drop))
                for _ in range(args.repeats)
            ]
            t = median(times)
            rows.append([name, f"{t:.3f}", f"{gib(nbytes) / t:.2f}", "cold" if drop and dropped else "warm"])
        base = float(rows[0][1])
        for r in rows:
            r.append(f"{float(r[1]) / base:.2f}x")
        print(f"restore of {gib(nbytes):.2f} GiB on 2 ranks, median of {args.repeats}")
        print(format_table(["source", "seconds", "GiB/s", "page cache", "vs RAM tier"], rows))
    finally:
        daemon.terminate()
        daemon.wait(60)
        s3.cleanup()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
