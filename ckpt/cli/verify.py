"""``ckpt verify``: read every chunk, check every block checksum, name what is corrupt."""

from __future__ import annotations

import argparse
import time

from ..sizes import format_size
from .common import EXIT_FAIL, EXIT_OK, add_command, emit_json, progress, say


def register(subparsers: argparse._SubParsersAction) -> None:
    sp = add_command(
        subparsers,
        "verify",
        "read every chunk and check every checksum",
        run,
        "Read every chunk of CKPT and check every block checksum (of compressed chunks: every stored "
        "frame, then its decoded size). Names each corrupt or unreadable chunk; exits 1 if there is any. "
        "Reports own bytes (in CKPT's objects) and shared bytes (chunks of earlier checkpoints it references).",
    )
    sp.add_argument("ckpt", metavar="CKPT")
    sp.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from ..interop import UnknownFormatError, detect_format
    from ..reader import CheckpointReader

    fmt = detect_format(args.ckpt)
    if fmt != "ckpt":
        raise UnknownFormatError(f"{args.ckpt}: a {fmt} checkpoint has no checksums to verify; `ckpt convert` it")
    reader = CheckpointReader(args.ckpt)
    m = reader.manifest
    from ..format import split_ref

    all_chunks = [c for r in m.tensors.values() for c in r.chunks]
    chunks = len(all_chunks)
    total = sum(c.length for c in all_chunks)
    shared = [c for c in all_chunks if split_ref(c.object) is not None]
    own_stored = sum(c.stored for c in all_chunks if split_ref(c.object) is None)
    shared_stored = sum(c.stored for c in shared)
    t0 = time.perf_counter()
    with progress(args, total, "verify") as tick:
        failures = reader.verify(progress=tick)
    dt = time.perf_counter() - t0
    if args.json:
        emit_json(
            {
                "uri": args.ckpt, "ok": not failures, "chunks": chunks, "bytes": total, "failures": failures,
                "own_stored_bytes": own_stored, "shared_chunks": len(shared), "shared_stored_bytes": shared_stored,
                "shared_from": sorted(m.refs),
            }
        )
    else:
        for f in failures:
            print(f"CORRUPT  {f}")
        if failures:
            print(f"FAILED: {len(failures)} of {chunks} chunk(s) corrupt or unreadable in {args.ckpt}")
        else:
            say(args, f"OK: {chunks} chunk(s), {format_size(total)} verified in {dt:.1f} s ({args.ckpt})")
            refs = f" in {', '.join(sorted(m.refs))}" if m.refs else ""
            say(args, f"stored: {format_size(own_stored)} own, {format_size(shared_stored)} shared "
                f"({len(shared)} chunk(s) referenced{refs})")
    return EXIT_FAIL if failures else EXIT_OK
