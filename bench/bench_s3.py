"""Save and load ~1 GiB on 2 ranks to a real S3 server: ckpt against DCP's fsspec path.

Starts SeaweedFS (`weed server -s3`, tests/seaweed.py) on 127.0.0.1 and, in the
same run against the same server, times on 2 gloo CPU ranks:

  save   ckpt.save(s3://...)                  vs dcp.save(FsspecWriter(s3://...))
  load   ckpt.load(s3://...) (same layout)    vs dcp.load(FsspecReader(s3://...))

The state is a set of fp32 DTensors sharded Shard(0) (large matrices plus small
vectors). Both systems get the same s3fs storage options (credentials and
endpoint); everything else is each system's default. Figures are medians over
--repeats, timed barrier to barrier (the slowest rank); the systems alternate
order between repeats; every load is checked bitwise outside the timed region.

Each operation also reports the CPU seconds of the server and of both ranks,
and their sum spread over the cores: on a small machine the server shares the
cores with the clients, and this floor shows how much of the wall time no
client could save (see bench/README.md).

--sweep also times ckpt saves over multipart part sizes and concurrencies
(the figures behind ckpt/storage/s3.py's defaults).

    .venv/bin/python bench/bench_s3.py --gib 1 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the SeaweedFS launcher

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from common import (  # noqa: E402
    cpu_seconds,
    format_table,
    machine_info,
    median,
    process_cpu_seconds,
    rate,
    run_ranks,
    timed_collective,
    write_json,
)
from seaweed import SeaweedFS  # noqa: E402
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Shard, distribute_tensor  # noqa: E402

import ckpt  # noqa: E402

TARGETS = {"save": 2.0, "load": 3.0}  # ckpt speed / DCP speed, from issue 4
MiB = 1 << 20


def make_state(gib: float, mesh, seed: int = 0) -> dict[str, DTensor]:
    """``gib`` GiB of fp32 in 4096-wide matrices (64 MiB each at full size) and small vectors."""
    cols = 4096
    rows_total = int(gib * (1 << 30)) // (4 * cols)
    n = max(1, rows_total // 4096)
    rows = rows_total // n
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(n):
        state[f"layer{i:02d}.weight"] = distribute_tensor(torch.randn(rows, cols, generator=g), mesh, [Shard(0)])
        state[f"layer{i:02d}.bias"] = distribute_tensor(torch.randn(cols, generator=g), mesh, [Shard(0)])
    return state


def zeros_like_state(state: dict[str, DTensor]) -> dict[str, DTensor]:
    return {
        k: DTensor.from_local(torch.zeros_like(v.to_local()), v.device_mesh, v.placements, run_check=False)
        for k, v in state.items()
    }


def nbytes(state: dict[str, DTensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def _check(got: dict[str, DTensor], want: dict[str, DTensor], what: str) -> None:
    for k in want:
        if not torch.equal(got[k].to_local(), want[k].to_local()):
            raise AssertionError(f"{what}: {k} differs from what was saved")


def timed_with_cpu(fn, server_pid: int) -> tuple[float, float, float]:
    """(wall s, server CPU s, CPU s of all ranks) of one collective operation.

    On a small machine the server shares the cores with the clients, so the
    CPU figures say how much of the wall time is the server's work and how
    much each client's.
    """
    server0, client0 = process_cpu_seconds(server_pid), cpu_seconds()
    wall = timed_collective(fn)
    server = process_cpu_seconds(server_pid) - server0
    client = torch.tensor([cpu_seconds() - client0], dtype=torch.float64)
    dist.all_reduce(client)
    return wall, server, float(client)


def rank_main(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """One rank: alternate ckpt / DCP saves and loads; return per-system timings and CPU."""
    mesh = init_device_mesh("cpu", (world,))
    state = make_state(args["gib"], mesh)
    opts = args["storage_options"]
    base = args["base"]
    out: dict[str, list[float]] = {"ckpt_save": [], "dcp_save": [], "ckpt_load": [], "dcp_load": []}
    cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in out}  # (server, clients) per run

    def timed(key: str, fn) -> None:
        wall, server, clients = timed_with_cpu(fn, args["server_pid"])
        out[key].append(wall)
        cpu[key].append((server, clients))

    def ckpt_save(i: int) -> None:
        ckpt.save(state, f"{base}/ckpt-{i}", options=ckpt.SaveOptions(storage_options=opts))

    def dcp_save(i: int) -> None:
        dcp.save(state, storage_writer=FsspecWriter(f"{base}/dcp-{i}", **opts))

    def ckpt_load(i: int, target) -> None:
        ckpt.load(target, f"{base}/ckpt-{i}", options=ckpt.LoadOptions(storage_options=opts))

    def dcp_load(i: int, target) -> None:
        dcp.load(target, storage_reader=FsspecReader(f"{base}/dcp-{i}", **opts))

    for i in range(args["repeats"]):
        order = ["ckpt", "dcp"] if i % 2 == 0 else ["dcp", "ckpt"]
        for system in order:
            fn = ckpt_save if system == "ckpt" else dcp_save
            timed(f"{system}_save", lambda fn=fn, i=i: fn(i))
        for system in order:
            target = zeros_like_state(state)
            fn = ckpt_load if system == "ckpt" else dcp_load
            timed(f"{system}_load", lambda fn=fn, i=i, target=target: fn(i, target))
            _check(target, state, f"{system} load {i}")
            del target
    return {"times": out, "cpu": cpu, "bytes": nbytes(state)}


def sweep_main(rank: int, world: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    """ckpt saves over multipart part sizes x concurrencies."""
    mesh = init_device_mesh("cpu", (world,))
    state = make_state(args["gib"], mesh)
    rows = []
    for part in args["parts"]:
        for conc in args["concurrency"]:
            opts = {**args["storage_options"], "default_block_size": part * MiB, "max_concurrency": conc}
            uri = f"{args['base']}/sweep-{part}-{conc}"
            t, server, clients = timed_with_cpu(
                lambda u=uri, o=opts: ckpt.save(state, u, options=ckpt.SaveOptions(storage_options=o)),
                args["server_pid"],
            )
            row = {"part_mib": part, "concurrency": conc, "seconds": t}
            rows.append({**row, "server_cpu": server, "clients_cpu": clients})
    dist.barrier()
    return rows


def warm_up(server: SeaweedFS, bucket: str) -> None:
    """SeaweedFS grows a new bucket's volumes on its first writes (seconds): do that untimed."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options())
    for i in range(4):
        fs.pipe_file(f"{bucket}/warmup/{i}", os.urandom(16 * MiB))
    fs.rm(f"{bucket}/warmup", recursive=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="global state size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep", action="store_true", help="also sweep ckpt's part size and upload concurrency")
    p.add_argument("--parts", default="8,16,32,64", help="part sizes (MiB) for --sweep")
    p.add_argument("--concurrency", default="2,4,8", help="upload concurrencies for --sweep")
    p.add_argument("--out", default=os.path.join(HERE, "out", "bench_s3.json"))
    a = p.parse_args()
    world = 2
    info = machine_info()
    cores = len(os.sched_getaffinity(0))
    t0 = time.time()
    with SeaweedFS() as server:
        print(f"SeaweedFS up at {server.endpoint_url} in {time.time() - t0:.1f}s", flush=True)
        bucket = server.make_bucket()
        warm_up(server, bucket)
        args = {
            "gib": a.gib,
            "repeats": a.repeats,
            "storage_options": server.storage_options(),
            "base": f"s3://{bucket}/bench",
            "server_pid": server.proc.pid,
        }
        results = run_ranks(rank_main, world, args)
        sweep = None
        if a.sweep:
            args["parts"] = [int(x) for x in a.parts.split(",")]
            args["concurrency"] = [int(x) for x in a.concurrency.split(",")]
            sweep = run_ranks(sweep_main, world, args)[0]
    times, cpu = results[0]["times"], results[0]["cpu"]
    # the timed region is barrier to barrier, so rank 0's figures are the collective's
    total = results[0]["bytes"]  # global bytes (every rank reports the same)
    rows, ratios = [], {}
    for op in ("save", "load"):
        c, d = median(times[f"ckpt_{op}"]), median(times[f"dcp_{op}"])
        ratios[op] = d / c
        rows.append([op, c, rate(total, c), d, rate(total, d), d / c, TARGETS[op]])
    print(f"\n{total / (1 << 30):.2f} GiB, {world} ranks, SeaweedFS on loopback, median of {a.repeats}")
    headers = ["op", "ckpt s", "ckpt GiB/s", "DCP s", "DCP GiB/s", "speedup", "target"]
    print(format_table(headers, rows))
    cpu_rows = []
    for key in ("ckpt_save", "dcp_save", "ckpt_load", "dcp_load"):
        server_s = median([c[0] for c in cpu[key]])
        client_s = median([c[1] for c in cpu[key]])
        cpu_rows.append([key.replace("_", " "), median(times[key]), server_s, client_s, (server_s + client_s) / cores])
    print(f"\nCPU seconds per operation (median); the floor is all CPU work spread over {cores} cores")
    print(format_table(["op", "wall s", "server CPU s", "clients CPU s", "floor s"], cpu_rows))
    if sweep:
        print("\nckpt save by multipart part size x concurrency (one run each)")
        headers = ["part MiB", "in flight", "save s", "GiB/s", "server CPU s", "clients CPU s"]
        sweep_rows = []
        for r in sweep:
            seconds = r["seconds"]
            row = [r["part_mib"], r["concurrency"], seconds, rate(total, seconds)]
            sweep_rows.append([*row, r["server_cpu"], r["clients_cpu"]])
        print(format_table(headers, sweep_rows))
    write_json(
        a.out,
        {
            "machine": info,
            "bytes": total,
            "world": world,
            "times": times,
            "cpu": cpu,
            "speedup": ratios,
            "targets": TARGETS,
            "sweep": sweep,
        },
    )


if __name__ == "__main__":
    main()
