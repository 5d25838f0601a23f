"""``ckpt diff``: which tensors differ between two checkpoints (any formats), and by how much."""

from __future__ import annotations

import argparse
import json

from .common import EXIT_FAIL, EXIT_OK, add_command, emit_json, progress, table


def register(subparsers: argparse._SubParsersAction) -> None:
    sp = add_command(
        subparsers,
        "diff",
        "which tensors differ between two checkpoints, and by how much",
        run,
        "Compare A and B (any formats) tensor by tensor, streaming: bitwise first, then the largest "
        "absolute difference and the relative L2 norm ||a-b||/||a||. Exits 1 if anything differs.",
    )
    sp.add_argument("a", metavar="A")
    sp.add_argument("b", metavar="B")
    sp.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0: bitwise)")
    sp.add_argument("--rtol", type=float, default=0.0, help="relative tolerance, |a-b| <= atol + rtol*|b|")
    sp.add_argument("--all", action="store_true", help="also list tensors that are identical")
    sp.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from ..diff import DiffStatus, diff
    from ..interop import open_source

    with open_source(args.a) as a, open_source(args.b) as b:
        total = sum(t.nbytes for k, t in a.tensors().items() if k in b.tensors())
        with progress(args, total, "diff") as tick:
            report = diff(a, b, args.atol, args.rtol, progress=tick)
    if args.json:
        emit_json(report.to_json())
        return EXIT_OK if report.equal else EXIT_FAIL
    shown = [t for t in report.tensors if t.differs or args.all]
    rows = [("STATUS", "SHAPE", "DTYPE", "MAX_ABS", "REL_L2", "N_DIFF", "KEY")]
    for t in shown:
        if t.status in (DiffStatus.ONLY_A, DiffStatus.ONLY_B):
            shape, dtype, nums = str(t.shape_a or t.shape_b), t.dtype_a or t.dtype_b or "", ("-", "-", "-")
        elif t.status is DiffStatus.SHAPE:
            shape, dtype, nums = f"{t.shape_a} vs {t.shape_b}", f"{t.dtype_a}/{t.dtype_b}", ("-", "-", "-")
        else:
            shape = str(t.shape_a)
            dtype = t.dtype_a if t.dtype_a == t.dtype_b else f"{t.dtype_a} vs {t.dtype_b}"
            nums = (f"{t.max_abs:.4g}", f"{t.rel_l2:.4g}", f"{t.n_diff}/{t.numel}")
        rows.append((t.status, shape, dtype or "-", *nums, t.key))
    if len(rows) > 1:
        table(rows)
    for v in report.values:
        print(f"value {v.status}: {v.key}: {json.dumps(v.a, default=str)} vs {json.dumps(v.b, default=str)}")
    counts: dict[str, int] = {}
    for t in report.tensors:
        counts[t.status] = counts.get(t.status, 0) + 1
    summary = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(counts.items()))
    verdict = "no differences" if report.equal else "DIFFERENT"
    print(f"{verdict}: {len(report.tensors)} tensor(s): {summary or 'none'}; {len(report.values)} value difference(s)")
    return EXIT_OK if report.equal else EXIT_FAIL
