"""``ckpt reshard``: rewrite a checkpoint with another chunking, or laid out for a target topology."""

from __future__ import annotations

import argparse
import re
import time

from ..sizes import format_size
from .common import EXIT_OK, UsageError, add_command, positive_int, progress, save_options, say, writing_options


def register(subparsers: argparse._SubParsersAction) -> None:
    sp = add_command(
        subparsers,
        "reshard",
        "rewrite a checkpoint with another chunking, or laid out for a target topology",
        run,
        "Rewrite CKPT at DST with another --chunk-bytes, or with --for-world N --layout shardD laid out "
        "so that each of N ranks holding dim D's torch.chunk share reads one contiguous object.",
    )
    sp.add_argument("ckpt", metavar="CKPT")
    sp.add_argument("dst", metavar="DST")
    sp.add_argument("--for-world", type=positive_int, metavar="N", help="target world size")
    sp.add_argument("--layout", metavar="shardD", help="shard0 (default with --for-world), shard1, ...")
    writing_options(sp)


def run(args: argparse.Namespace) -> int:
    from ..interop import open_source
    from ..interop.convert import convert
    from ..reshard import TargetLayout, reshard_for

    if args.layout and not args.for_world:
        raise UsageError("--layout needs --for-world N")
    options = save_options(args)
    with open_source(args.ckpt) as src:
        total = sum(t.nbytes for t in src.tensors().values())
        t0 = time.perf_counter()
        with progress(args, total, "reshard") as tick:
            if args.for_world:
                m = re.fullmatch(r"shard(\d+)", args.layout or "shard0")
                if not m:
                    raise UsageError(f"--layout {args.layout!r}: expected shard0, shard1, ...")
                layout = TargetLayout(args.for_world, int(m.group(1)))
                manifest = reshard_for(src, args.dst, layout, options, progress=tick)
                how = f"laid out for {layout}"
            else:
                manifest = convert(src, args.dst, options, progress=tick)
                how = f"rechunked to {format_size(options.chunk_bytes)} chunks"
    dt = time.perf_counter() - t0
    say(args, f"{how}: {len(manifest.tensors)} tensor(s), {format_size(total)} in {dt:.1f} s: {args.dst}")
    return EXIT_OK
