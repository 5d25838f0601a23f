"""``ckpt export``: a checkpoint as HF safetensors shards, a DCP checkpoint or one torch.save file."""

from __future__ import annotations

import argparse
import os
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
        "reads; --to torch writes one torch.save file (needs the whole model in memory). DST must not exist. "
        "For the HF Hub: --only picks the model's sub-tree of a training checkpoint, --strip-prefix drops what "
        "precedes transformers' names, and --config-dir copies the model directory's config.json and tokenizer "
        "files beside the shards and stores each weight the model ties once, as from_pretrained expects.",
    )
    sp.add_argument("ckpt", metavar="CKPT")
    sp.add_argument("dst", metavar="DST")
    sp.add_argument("--to", required=True, choices=["safetensors", "dcp", "torch"])
    sp.add_argument("--max-shard-size", type=parse_size, help="safetensors shard limit, e.g. 5GB (default: one file)")
    sp.add_argument("--only", metavar="KEY", help="export only KEY or the sub-tree under it (e.g. model)")
    sp.add_argument("--strip-prefix", metavar="PREFIX", help="drop PREFIX from every exported key (e.g. model.)")
    sp.add_argument(
        "--config-dir",
        metavar="DIR",
        help="safetensors: a local model directory (config.json, tokenizer files) whose files are copied beside the "
        "shards; the model class its config names says which weights are tied (needs transformers) and which keys "
        "it expects",
    )
    sp.add_argument(
        "--tie",
        metavar="TARGET=SOURCE",
        action="append",
        type=_tie,
        help="safetensors: TARGET is tied to SOURCE and not stored (repeatable; instead of asking transformers)",
    )
    sp.add_argument(
        "--no-key-check",
        action="store_true",
        help="with --config-dir: export even if the model would report missing or unexpected keys",
    )
    sp.add_argument(
        "--batch-bytes",
        type=parse_size,
        default=1 << 30,
        help="dcp: memory cap per write batch (default 1GiB; a larger tensor is a batch alone)",
    )


def _tie(text: str) -> tuple[str, str]:
    from ..interop.hf_model import parse_ties

    try:
        return next(iter(parse_ties([text]).items()))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from ..interop import export_dcp, export_safetensors, export_torch, open_source
    from ..interop.destination import check_destination, cleanup_on_failure
    from ..interop.hf_export import copy_side_files, hf_view
    from ..interop.view import select

    for flag in ("max_shard_size", "config_dir", "tie"):
        if getattr(args, flag) and args.to != "safetensors":
            raise UsageError(f"--{flag.replace('_', '-')} applies to --to safetensors")
    if args.no_key_check and not args.config_dir:
        raise UsageError("--no-key-check applies with --config-dir")
    if args.config_dir and args.dst.rstrip("/").endswith(".safetensors"):
        raise UsageError("--config-dir writes a model directory: DST must not end in .safetensors")
    if args.config_dir and not os.path.isdir(args.config_dir):
        raise UsageError(f"--config-dir {args.config_dir}: not a local directory")
    with open_source(args.ckpt) as whole:
        existed = check_destination(args.dst, can_overwrite=False)
        plan = None
        if args.to == "safetensors":
            ties = dict(args.tie) if args.tie else None
            src, plan = hf_view(whole, args.only, args.strip_prefix, args.config_dir, ties, not args.no_key_check)
        else:
            src = select(whole, args.only, args.strip_prefix)
        total = sum(t.nbytes for t in src.tensors().values())
        t0 = time.perf_counter()
        with progress(args, total, f"export {args.to}") as tick, cleanup_on_failure(args.dst, existed, [""]):
            if args.to == "safetensors":
                files = export_safetensors(src, args.dst, args.max_shard_size, progress=tick)
                if args.config_dir:
                    files += copy_side_files(args.config_dir, args.dst, plan.side_files)
                what = f"{len(files)} file(s)"
                if plan.tied:
                    what += ", tied: " + ", ".join(f"{t} -> {s}" for t, s in plan.tied.items())
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
