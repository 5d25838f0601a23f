"""``ckpt convert``: a DCP, HF safetensors or torch.save checkpoint into this format, streaming."""

from __future__ import annotations

import argparse
import time

from ..sizes import format_size
from .common import EXIT_OK, add_command, progress, save_options, say, writing_options


def register(subparsers: argparse._SubParsersAction) -> None:
    sp = add_command(
        subparsers,
        "convert",
        "convert a DCP, HF safetensors or torch.save checkpoint into this format",
        run,
        "Convert SRC into a ckpt checkpoint at DST, streaming in bounded memory. SRC is detected: a DCP "
        "directory (.metadata), a .safetensors file or a directory with model.safetensors[.index.json], "
        "or a torch.save file (loaded with weights_only=True: nothing that runs code is unpickled).",
    )
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("dst", metavar="DST")
    sp.add_argument("--from", dest="from_format", choices=["ckpt", "dcp", "safetensors", "torch"])
    writing_options(sp)


def run(args: argparse.Namespace) -> int:
    from ..interop import open_source
    from ..interop.convert import convert

    options = save_options(args)
    with open_source(args.src, args.from_format) as src:
        total = sum(t.nbytes for t in src.tensors().values())
        meta = {"converted_from": {"format": src.format, "uri": args.src}}
        t0 = time.perf_counter()
        with progress(args, total, "convert") as tick:
            m = convert(src, args.dst, options, progress=tick, metadata=meta)
    dt = time.perf_counter() - t0
    what = f"{len(m.tensors)} tensor(s), {format_size(total)}"
    say(args, f"converted {src.format} -> ckpt: {what} in {dt:.1f} s: {args.dst}")
    return EXIT_OK
