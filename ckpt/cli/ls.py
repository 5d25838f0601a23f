"""``ckpt ls``: list the checkpoints under a root with step, status, size, time and metrics."""

from __future__ import annotations

import argparse
import sys

from ..sizes import format_size
from .common import EXIT_OK, add_command, emit_json, metrics_text, one_line, table, timestamp


def register(subparsers: argparse._SubParsersAction) -> None:
    sp = add_command(
        subparsers,
        "ls",
        "list the checkpoints under a root",
        run,
        "List the checkpoints directly under ROOT: step, status (complete; incomplete = data but no "
        "manifest, a save that never committed; damaged = unreadable manifest; retired = deleted, keeping only "
        "objects later checkpoints reference), size (bytes stored in its own location), shared (bytes of "
        "earlier checkpoints' objects it references: an incremental save), time, metrics.",
    )
    sp.add_argument("root", metavar="ROOT")
    sp.add_argument("--json", action="store_true", help="print a JSON list")


def run(args: argparse.Namespace) -> int:
    from ..catalog import scan

    entries = scan(args.root)
    if args.json:
        emit_json([e.to_json() for e in entries])
        return EXIT_OK
    if not entries:
        print(f"no checkpoints under {args.root}", file=sys.stderr)
        return EXIT_OK
    rows = [("STEP", "STATUS", "SIZE", "SHARED", "CREATED", "METRICS", "NAME")]
    for e in entries:
        step = str(e.step) if e.step is not None else "-"
        name = f"{e.name}  <- latest" if e.latest else e.name
        shared = format_size(e.shared) if e.shared else "-"
        rows.append(
            (step, e.status, format_size(e.size), shared, timestamp(e.created), metrics_text(e.metrics), name)
        )
    table(rows)
    for e in entries:
        if e.error:
            print(f"{e.name}: {e.status}: {one_line(Exception(e.error))}")
    return EXIT_OK
