"""``ckpt export``: a checkpoint as HF safetensors shards, a DCP checkpoint or one torch.save file."""

from __future__ import annotations

import argparse
import time

from ..sizes import format_size, parse_size
from .common import EXIT_OK, UsageError, add_command, progress, say


def register(subparsers: argparse._SubParsersAction) -> None:
    sp = add_command(
        subparsers,
        "export",
        "export a checkpoint as HF safetensors, DCP or a torch.save file",
        run,
        "Export CKPT to DST: --to safetensors writes HF-style shards with model.safetensors.index.json "
        "(or DST.safetensors as one file); --to dcp writes a checkpoint torch.distributed.checkpoint.load "
        "reads; --to torch writes one torch.save file (needs the whole model in memory). DST must not exist.",
    )
    sp.add_argument("ckpt", metavar="CKPT")
    sp.add_argument("dst", metavar="DST")
    sp.add_argument("--to", required=True, choices=["safetensors", "dcp", "torch"])
    sp.add_argument("--max-shard-size", type=parse_size, help="safetensors shard limit, e.g. 5GB (default: one file)")
    sp.add_argument(
        "--batch-bytes",
        type=parse_size,
        default=1 << 30,
        help="dcp: memory cap per write batch (default 1GiB; a larger tensor is a batch alone)",
    )


def run(args: argparse.Namespace) -> int:
    from ..interop import export_dcp, export_safetensors, export_torch, open_source
    from ..interop.destination import check_destination, cleanup_on_failure

    if args.max_shard_size and args.to != "safetensors":
        raise UsageError("--max-shard-size applies to --to safetensors")
    with open_source(args.ckpt) as src:
        existed = check_destination(args.dst, can_overwrite=False)
        total = sum(t.nbytes for t in src.tensors().values())
        t0 = time.perf_counter()
        with progress(args, total, f"export {args.to}") as tick, cleanup_on_failure(args.dst, existed, [""]):
            if args.to == "safetensors":
                files = export_safetensors(src, args.dst, args.max_shard_size, progress=tick)
                what = f"{len(files)} file(s)"
            elif args.to == "dcp":
                batches = export_dcp(src, args.dst, args.batch_bytes, progress=tick)
                what = f"{batches} batch(es)"
            else:
                export_torch(src, args.dst, progress=tick)
                what = "1 file"
    dt = time.perf_counter() - t0
    n = len(src.tensors())
    say(args, f"exported {n} tensor(s), {format_size(total)} as {args.to} ({what}) in {dt:.1f} s: {args.dst}")
    return EXIT_OK
