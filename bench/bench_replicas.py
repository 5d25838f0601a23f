"""Loading replicated state from a bandwidth-limited store at 1, 2 and 4 replicas: ckpt against DCP.

Every rank holds the whole state (data-parallel replicas: a llama-shaped model in bf16 plus AdamW state
in fp32, as plain tensors), saved once by one rank with each system. The replicas then load it through
``slowfs://`` (tests/slowfs.py): the saved files behind one link of ``--rate-mbs`` MB/s that every rank's
reads share (a FIFO token bucket in a file, so the link is the job's, not each rank's), counting every
byte read. Systems, in alternating order within one set of ranks per replica count:

  ckpt          ckpt.load, share_replicas="auto" (slowfs is remote: each byte is read once, then broadcast)
  ckpt-direct   ckpt.load, share_replicas=False (every replica reads everything)
  dcp           dcp.load with FsspecReader over the same link

Each figure is the median of --repeats loads, timed barrier to barrier (the slowest rank). Every load is
checked bitwise against the saved tensors, outside the timed region. Bytes read are every byte through
the link (data and metadata), summed over ranks.

    .venv/bin/python bench/bench_replicas.py --gib 0.25 --rate-mbs 200 --replicas 1,2,4 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from bench_save_load import ModelShape, content, state_bytes, tensor_specs
from common import _launcher as launcher
from common import (
    cpu_seconds,
    filesystem_of,
    format_table,
    machine_info,
    median,
    rate,
    timed_collective,
    write_json,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

import ckpt

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = ("ckpt", "ckpt-direct", "dcp")


def _state(gib: float, fill: bool) -> dict[str, torch.Tensor]:
    """The saved state (``fill``) or a target of the same structure (zeros)."""
    out = {}
    for key, shape, dtype in tensor_specs(ModelShape.for_gib(gib)):
        out[key] = content(key, shape, (0,) * len(shape), shape, dtype) if fill else torch.zeros(shape, dtype=dtype)
    return out


def save_job(rank: int, world: int, root: str, gib: float) -> None:
    state = _state(gib, fill=True)
    ckpt.save(state, f"{root}/ckpt")
    dcp.save(state, storage_writer=FileSystemWriter(f"{root}/dcp"))


def _load(system: str, state: dict, root: str, link: dict[str, Any]) -> None:
    if system == "dcp":
        dcp.load(state, storage_reader=FsspecReader(f"slowfs://{root}/dcp", **link))
        return
    share = "auto" if system == "ckpt" else False
    ckpt.load(state, f"slowfs://{root}/ckpt", options=ckpt.LoadOptions(storage_options=link, share_replicas=share))


def load_job(rank: int, world: int, root: str, gib: float, rate_bps: float, repeats: int) -> dict:
    import slowfs  # tests/slowfs.py (common.py puts tests/ on the path); registers slowfs://

    counter = f"{root}/link-{world}"
    link = {"rate": rate_bps, "state": counter}
    want = _state(gib, fill=True)
    out: dict[str, dict[str, list]] = {s: {"s": [], "bytes": [], "requests": [], "cpu": []} for s in SYSTEMS}
    for rep in range(repeats):
        for system in SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]:
            state = _state(gib, fill=False)
            if rank == 0:
                slowfs.reset(counter)
            cpu0 = cpu_seconds()
            seconds = timed_collective(lambda s=system, st=state: _load(s, st, root, link))
            cpu = torch.tensor([cpu_seconds() - cpu0])
            dist.all_reduce(cpu)
            nbytes, requests = slowfs.total(counter)
            bad = [k for k, v in want.items() if not torch.equal(state[k], v)]
            if bad:
                raise AssertionError(f"{system} at {world} replicas: {len(bad)} tensors differ, e.g. {bad[:3]}")
            dist.barrier()  # nobody resets the link before everyone has read its totals
            for name, v in (("s", seconds), ("bytes", nbytes), ("requests", requests), ("cpu", cpu.item())):
                out[system][name].append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=0.25, help="state size (every replica holds all of it)")
    ap.add_argument("--rate-mbs", type=float, default=200.0, help="the store's bandwidth, MB/s, shared by all ranks")
    ap.add_argument("--replicas", default="1,2,4", help="replica counts (one rank each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="bench-replicas-")
    os.makedirs(root, exist_ok=True)
    total = state_bytes(ModelShape.for_gib(args.gib))
    n = len(tensor_specs(ModelShape.for_gib(args.gib)))
    info = machine_info()
    print(f"state {total / 2**30:.3f} GiB in {n} tensors; link {args.rate_mbs:g} MB/s; {filesystem_of(root)} at {root}")
    print(f"one copy through the link: {total / (args.rate_mbs * 1e6):.2f} s; load average {info['loadavg_at_start']}")
    try:
        launcher.run_ranks(save_job, 1, root, args.gib, start_method="forkserver", timeout=1800)
        rows, results = [], {}
        for k in (int(x) for x in args.replicas.split(",")):
            r = launcher.run_ranks(
                load_job, k, root, args.gib, args.rate_mbs * 1e6, args.repeats, start_method="forkserver", timeout=3600
            )[0]
            results[k] = r
            for system in SYSTEMS:
                s = median(r[system]["s"])
                nbytes = median(r[system]["bytes"])
                base = median(results[min(results)][system]["s"])
                rows.append(
                    [
                        k,
                        system,
                        s,
                        rate(total, s),
                        nbytes / 2**30,
                        nbytes / total,
                        int(median(r[system]["requests"])),
                        median(r[system]["cpu"]),
                        s / base,
                        " ".join(f"{x:.2f}" for x in r[system]["s"]),
                    ]
                )
        headers = ["replicas", "system", "median s", "GiB/s", "read GiB", "x state", "requests", "CPU s"]
        headers += ["vs fewest", "runs s"]
        print(format_table(headers, rows))
        print(
            "read GiB: every byte through the link (data and metadata), all ranks; x state: that over the state's "
            "size; vs fewest: median s over the same system's at the fewest replicas (flat = 1.0); CPU s: user+sys "
            "summed over ranks."
        )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        doc = {
            "machine": info,
            "args": vars(args),
            "state_bytes": total,
            "tensors": n,
            "loadavg_at_end": os.getloadavg(),
            "results": results,
            "table": {"headers": headers, "rows": rows},
        }
        write_json(os.path.join(args.out, f"replicas-{stamp}.json"), doc)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
