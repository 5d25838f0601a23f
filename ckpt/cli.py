"""``ckpt``: inspect, verify, compare, convert, export, reshard and clean up checkpoints.

Exit codes scripts can rely on:
  0  success (verify: every checksum matches; diff: no difference)
  1  the check failed or the input is damaged: corrupt chunk, unreadable manifest,
     differences found, I/O failure
  2  usage error, or an input that is not a checkpoint / a destination that is in the way
Errors are one line on stderr; a failing command leaves its destination as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from . import __version__
from .errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError
from .merge.cli import register as register_merge

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class UsageError(CheckpointError):
    """Arguments that do not make sense together."""


def parse_size(text: str) -> int:
    """``5GB`` (decimal, like the Hub), ``64MiB`` (binary) or plain bytes."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 500MB, 64MiB, 1048576)")
    unit = (m.group(2) or "").lower()
    scale = _UNITS[unit[:1]] if "i" not in unit else 1 << (10 * " kmgt".index(unit[0]))
    n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be positive")
    return n


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return n


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@contextmanager
def progress(args: argparse.Namespace, total: int, desc: str) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr, shown only on a terminal and without --quiet."""
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=args.quiet or not sys.stderr.isatty(),
        file=sys.stderr,
        leave=False,
    )
    try:
        yield bar.update
    finally:
        bar.close()


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text)


def _emit_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _time(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t is not None else "-"


def _metrics(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(m.items())) or "-"


# --- ls / gc -------------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    from .catalog import scan

    entries = scan(args.root)
    if args.json:
        _emit_json([e.to_json() for e in entries])
        return EXIT_OK
    if not entries:
        print(f"no checkpoints under {args.root}", file=sys.stderr)
        return EXIT_OK
    rows = [("STEP", "STATUS", "SIZE", "CREATED", "METRICS", "NAME")]
    for e in entries:
        step = str(e.step) if e.step is not None else "-"
        name = f"{e.name}  <- latest" if e.latest else e.name
        rows.append((step, e.status, human(e.size), _time(e.created), _metrics(e.metrics), name))
    _table(rows)
    for e in entries:
        if e.error:
            print(f"{e.name}: {e.status}: {_one_line(Exception(e.error))}")
    return EXIT_OK


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def cmd_gc(args: argparse.Namespace) -> int:
    from .catalog import COMPLETE, abort_upload, delete, open_uploads, plan_gc, scan, stale_uploads
    from .retention import RetentionPolicy

    if (args.keep_best is None) != (args.metric is None):
        raise UsageError("--keep-best and --metric go together")
    policy = RetentionPolicy(
        keep_last=args.keep_last,
        keep_best=args.keep_best,
        best_metric=args.metric,
        best_mode=args.mode,
        keep_every=args.keep_every,
    )
    entries = scan(args.root)
    doomed = plan_gc(entries, policy)
    doomed_names = {e.name for e in doomed}
    uploads = stale_uploads(open_uploads(args.root), doomed, time.time(), args.abort_uploads_after * 3600)
    done = []
    for e in doomed:
        if args.yes:
            delete(e)
        done.append(e)
    for u in uploads if args.yes else ():
        abort_upload(args.root, u)
    if args.json:
        _emit_json(
            {
                "dry_run": not args.yes,
                "deleted" if args.yes else "would_delete": [e.to_json() for e in done],
                "kept": [e.to_json() for e in entries if e.name not in doomed_names],
                "aborted_uploads" if args.yes else "would_abort_uploads": [u.to_json() for u in uploads],
            }
        )
        return EXIT_OK
    verb = "deleted" if args.yes else "would delete"
    for e in done:
        why = "retention" if e.status == COMPLETE else "incomplete"
        step = e.step if e.step is not None else "-"
        print(f"{verb}  {e.name}  (step {step}, {human(e.size)}, {why})")
    for u in uploads:
        print(f"{'aborted' if args.yes else 'would abort'}  upload of {u.key}  (started {_time(u.started)})")
    freed = sum(e.size for e in done)
    kept = len(entries) - len(done)
    print(f"{verb} {len(done)} checkpoint(s), {human(freed)}; kept {kept}")
    if (done or uploads) and not args.yes:
        print("dry run: nothing was deleted; pass --yes to delete")
    return EXIT_OK


# --- info / verify / diff ------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from .interop import CkptSource, detect_format, open_source

    fmt = args.format or detect_format(args.ckpt)
    if fmt != "ckpt":
        with open_source(args.ckpt, fmt) as src:
            return _info_foreign(args, src)
    src = CkptSource(args.ckpt)
    m = src.reader.manifest
    size = sum(m.objects.values())
    tensors = {}
    for key, rec in sorted(m.tensors.items()):
        t: dict[str, Any] = {
            "shape": list(rec.shape),
            "dtype": str(rec.dtype).removeprefix("torch."),
            "nbytes": rec.nbytes,
            "chunks": len(rec.chunks),
            "layout": rec.layout,
        }
        if args.chunks:
            t["chunk_list"] = [c.to_json() | {"checksums": len(c.checksums)} for c in rec.chunks]
        tensors[key] = t
    doc = {
        "uri": args.ckpt,
        "format": "ckpt",
        "save_id": m.save_id,
        "library_version": m.library_version,
        "created": m.created,
        "step": m.step,
        "metrics": m.metrics,
        "metadata": m.metadata,
        "topology": m.topology,
        "block_bytes": m.block_bytes,
        "objects": len(m.objects),
        "size": size,
        "values": m.values,
        "tensors": tensors,
    }
    if args.json:
        _emit_json(doc)
        return EXIT_OK
    nbytes = sum(t["nbytes"] for t in tensors.values())
    print(f"checkpoint  {args.ckpt}")
    print(f"saved       {m.created or '-'} by ckpt {m.library_version or '?'} (save {m.save_id})")
    print(f"step        {m.step if m.step is not None else '-'}")
    print(f"metrics     {_metrics(m.metrics)}")
    if m.metadata:
        print(f"metadata    {json.dumps(m.metadata, default=str)}")
    topo = " ".join(f"{k}={v}" for k, v in m.topology.items() if k != "bytes_written_per_rank") or "-"
    print(f"topology    {topo}")
    print(f"storage     {human(size)} in {len(m.objects)} object(s), checksum blocks of {human(m.block_bytes)}")
    print(f"contents    {len(tensors)} tensor(s), {human(nbytes)}; {len(m.values)} value(s)")
    rows = [("KEY", "SHAPE", "DTYPE", "CHUNKS", "SIZE", "LAYOUT")]
    for key, t in tensors.items():
        rows.append((key, str(t["shape"]), t["dtype"], str(t["chunks"]), human(t["nbytes"]), t["layout"] or "-"))
        for c in t.get("chunk_list", []):
            box = f"  @{c['offsets']} {c['sizes']}"
            rows.append((box, "", "", "", human(c["length"]), f"{c['object']} +{c['offset']}"))
    print()
    _table(rows)
    if m.values:
        print()
        for key, v in sorted(m.values.items()):
            print(f"{key} = {json.dumps(v, default=str)}")
    return EXIT_OK


def _info_foreign(args: argparse.Namespace, src) -> int:
    tensors = {
        k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "nbytes": t.nbytes}
        for k, t in src.tensors().items()
    }
    values = src.values()
    if args.json:
        _emit_json({"uri": args.ckpt, "format": src.format, "values": values, "tensors": tensors})
        return EXIT_OK
    nbytes = sum(t["nbytes"] for t in tensors.values())
    print(f"checkpoint  {args.ckpt}")
    print(f"format      {src.format}")
    print(f"contents    {len(tensors)} tensor(s), {human(nbytes)}; {len(values)} value(s)")
    rows = [("KEY", "SHAPE", "DTYPE", "SIZE")]
    rows += [(k, str(t["shape"]), t["dtype"], human(t["nbytes"])) for k, t in tensors.items()]
    print()
    _table(rows)
    for key, v in sorted(values.items()):
        print(f"{key} = {json.dumps(v, default=str)}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from .interop import UnknownFormatError, detect_format
    from .reader import CheckpointReader

    fmt = detect_format(args.ckpt)
    if fmt != "ckpt":
        raise UnknownFormatError(f"{args.ckpt}: a {fmt} checkpoint has no checksums to verify; `ckpt convert` it")
    reader = CheckpointReader(args.ckpt)
    m = reader.manifest
    chunks = sum(len(r.chunks) for r in m.tensors.values())
    total = sum(c.length for r in m.tensors.values() for c in r.chunks)
    t0 = time.perf_counter()
    with progress(args, total, "verify") as tick:
        failures = reader.verify(progress=tick)
    dt = time.perf_counter() - t0
    if args.json:
        _emit_json({"uri": args.ckpt, "ok": not failures, "chunks": chunks, "bytes": total, "failures": failures})
    else:
        for f in failures:
            print(f"CORRUPT  {f}")
        if failures:
            print(f"FAILED: {len(failures)} of {chunks} chunk(s) corrupt or unreadable in {args.ckpt}")
        else:
            _say(args, f"OK: {chunks} chunk(s), {human(total)} verified in {dt:.1f} s ({args.ckpt})")
    return EXIT_FAIL if failures else EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    from .diff import ONLY_A, ONLY_B, SHAPE, diff
    from .interop import open_source

    with open_source(args.a) as a, open_source(args.b) as b:
        total = sum(t.nbytes for k, t in a.tensors().items() if k in b.tensors())
        with progress(args, total, "diff") as tick:
            report = diff(a, b, args.atol, args.rtol, progress=tick)
    if args.json:
        _emit_json(report.to_json())
        return EXIT_OK if report.equal else EXIT_FAIL
    shown = [t for t in report.tensors if t.differs or args.all]
    rows = [("STATUS", "SHAPE", "DTYPE", "MAX_ABS", "REL_L2", "N_DIFF", "KEY")]
    for t in shown:
        if t.status in (ONLY_A, ONLY_B):
            shape, dtype, nums = str(t.shape_a or t.shape_b), t.dtype_a or t.dtype_b or "", ("-", "-", "-")
        elif t.status == SHAPE:
            shape, dtype, nums = f"{t.shape_a} vs {t.shape_b}", f"{t.dtype_a}/{t.dtype_b}", ("-", "-", "-")
        else:
            shape = str(t.shape_a)
            dtype = t.dtype_a if t.dtype_a == t.dtype_b else f"{t.dtype_a} vs {t.dtype_b}"
            nums = (f"{t.max_abs:.4g}", f"{t.rel_l2:.4g}", f"{t.n_diff}/{t.numel}")
        rows.append((t.status, shape, dtype or "-", *nums, t.key))
    if len(rows) > 1:
        _table(rows)
    for v in report.values:
        print(f"value {v.status}: {v.key}: {json.dumps(v.a, default=str)} vs {json.dumps(v.b, default=str)}")
    counts: dict[str, int] = {}
    for t in report.tensors:
        counts[t.status] = counts.get(t.status, 0) + 1
    summary = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(counts.items()))
    verdict = "no differences" if report.equal else "DIFFERENT"
    print(f"{verdict}: {len(report.tensors)} tensor(s): {summary or 'none'}; {len(report.values)} value difference(s)")
    return EXIT_OK if report.equal else EXIT_FAIL


# --- convert / export / reshard ------------------------------------------------------------------


def _save_options(args: argparse.Namespace):
    from .save import SaveOptions

    kw: dict[str, Any] = {"overwrite": getattr(args, "overwrite", False)}
    if getattr(args, "chunk_bytes", None):
        kw["chunk_bytes"] = args.chunk_bytes
    if getattr(args, "block_bytes", None):
        if args.block_bytes % 64:
            raise UsageError("--block-bytes must be a multiple of 64")
        kw["block_bytes"] = args.block_bytes
    return SaveOptions(**kw)


def cmd_convert(args: argparse.Namespace) -> int:
    from .interop import open_source
    from .interop.convert import convert

    options = _save_options(args)
    with open_source(args.src, args.from_format) as src:
        total = sum(t.nbytes for t in src.tensors().values())
        meta = {"converted_from": {"format": src.format, "uri": args.src}}
        t0 = time.perf_counter()
        with progress(args, total, "convert") as tick:
            m = convert(src, args.dst, options, progress=tick, metadata=meta)
    dt = time.perf_counter() - t0
    _say(args, f"converted {src.format} -> ckpt: {len(m.tensors)} tensor(s), {human(total)} in {dt:.1f} s: {args.dst}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .interop import export_dcp, export_safetensors, export_torch, open_source
    from .interop.destination import check_destination, cleanup_on_failure

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
    _say(args, f"exported {n} tensor(s), {human(total)} as {args.to} ({what}) in {dt:.1f} s: {args.dst}")
    return EXIT_OK


def cmd_reshard(args: argparse.Namespace) -> int:
    from .interop import open_source
    from .interop.convert import convert
    from .reshard import TargetLayout, reshard_for

    if args.layout and not args.for_world:
        raise UsageError("--layout needs --for-world N")
    options = _save_options(args)
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
                how = f"laid out for {layout.describe()}"
            else:
                manifest = convert(src, args.dst, options, progress=tick)
                how = f"rechunked to {human(options.chunk_bytes)} chunks"
    dt = time.perf_counter() - t0
    _say(args, f"{how}: {len(manifest.tensors)} tensor(s), {human(total)} in {dt:.1f} s: {args.dst}")
    return EXIT_OK


# --- parser --------------------------------------------------------------------------------------

_EPILOG = """\
locations are local paths or fsspec URLs (s3://bucket/prefix, memory://...); fsspec reads
credentials and options from its usual environment variables.

exit codes: 0 ok; 1 check failed (corrupt data, damaged manifest, differences, I/O error);
2 usage error, not a checkpoint, or destination in the way.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ckpt",
        description="Inspect, verify, compare, convert, export, reshard and clean up PyTorch checkpoints.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"ckpt {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or success messages")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, func, description: str | None = None) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help,
            description=description or help,
            parents=[common],
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.set_defaults(func=func)
        return sp

    sp = add(
        "ls",
        "list the checkpoints under a root",
        cmd_ls,
        "List the checkpoints directly under ROOT: step, status (complete; incomplete = data but no "
        "manifest, a save that never committed; damaged = unreadable manifest), size, time, metrics.",
    )
    sp.add_argument("root", metavar="ROOT")
    sp.add_argument("--json", action="store_true", help="print a JSON list")

    sp = add(
        "info",
        "show a checkpoint's tensors, chunking, topology and metadata",
        cmd_info,
        "Show a checkpoint's tensors (shape, dtype, chunks, layout), the topology it was saved from, "
        "step, metrics and metadata. Also reads DCP, safetensors and torch.save checkpoints.",
    )
    sp.add_argument("ckpt", metavar="CKPT")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument("--chunks", action="store_true", help="list every chunk (box, object, offset)")
    sp.add_argument("--format", choices=["ckpt", "dcp", "safetensors", "torch"], help="skip format detection")

    sp = add(
        "verify",
        "read every chunk and check every checksum",
        cmd_verify,
        "Read every chunk of CKPT and check every block checksum. Names each corrupt or unreadable "
        "chunk; exits 1 if there is any.",
    )
    sp.add_argument("ckpt", metavar="CKPT")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add(
        "diff",
        "which tensors differ between two checkpoints, and by how much",
        cmd_diff,
        "Compare A and B (any formats) tensor by tensor, streaming: bitwise first, then the largest "
        "absolute difference and the relative L2 norm ||a-b||/||a||. Exits 1 if anything differs.",
    )
    sp.add_argument("a", metavar="A")
    sp.add_argument("b", metavar="B")
    sp.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0: bitwise)")
    sp.add_argument("--rtol", type=float, default=0.0, help="relative tolerance, |a-b| <= atol + rtol*|b|")
    sp.add_argument("--all", action="store_true", help="also list tensors that are identical")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add(
        "convert",
        "convert a DCP, HF safetensors or torch.save checkpoint into this format",
        cmd_convert,
        "Convert SRC into a ckpt checkpoint at DST, streaming in bounded memory. SRC is detected: a DCP "
        "directory (.metadata), a .safetensors file or a directory with model.safetensors[.index.json], "
        "or a torch.save file (loaded with weights_only=True: nothing that runs code is unpickled).",
    )
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("dst", metavar="DST")
    sp.add_argument("--from", dest="from_format", choices=["ckpt", "dcp", "safetensors", "torch"])
    _writing_options(sp)

    sp = add(
        "export",
        "export a checkpoint as HF safetensors, DCP or a torch.save file",
        cmd_export,
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

    sp = add(
        "reshard",
        "rewrite a checkpoint with another chunking, or laid out for a target topology",
        cmd_reshard,
        "Rewrite CKPT at DST with another --chunk-bytes, or with --for-world N --layout shardD laid out "
        "so that each of N ranks holding dim D's torch.chunk share reads one contiguous object.",
    )
    sp.add_argument("ckpt", metavar="CKPT")
    sp.add_argument("dst", metavar="DST")
    sp.add_argument("--for-world", type=_positive_int, metavar="N", help="target world size")
    sp.add_argument("--layout", metavar="shardD", help="shard0 (default with --for-world), shard1, ...")
    _writing_options(sp)

    sp = add(
        "gc",
        "remove incomplete checkpoints and those a retention rule drops (dry run by default)",
        cmd_gc,
        "Remove, under ROOT, incomplete checkpoints older than the newest complete one, and complete ones "
        "no retention rule keeps. Without a rule every complete checkpoint is kept. The newest complete "
        "checkpoint, the one the `latest` marker names, and damaged ones are never deleted. On S3 it also "
        "aborts unfinished multipart uploads (a killed writer's parts, stored and billed but in no object): "
        "those inside a deleted checkpoint and any older than --abort-uploads-after. Prints what it would "
        "do unless --yes.",
    )
    sp.add_argument("root", metavar="ROOT")
    sp.add_argument("--keep-last", type=_positive_int, metavar="N", help="keep the N newest")
    sp.add_argument("--keep-every", type=_positive_int, metavar="N", help="keep those whose step is a multiple of N")
    sp.add_argument("--keep-best", type=_positive_int, metavar="K", help="keep the K best by --metric")
    sp.add_argument("--metric", help="metric name for --keep-best")
    sp.add_argument("--mode", choices=["min", "max"], default="min", help="best is min (default) or max")
    sp.add_argument(
        "--abort-uploads-after",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="abort multipart uploads started longer ago than this (default 24)",
    )
    sp.add_argument("--yes", action="store_true", help="really delete")
    sp.add_argument("--json", action="store_true", help="print JSON")

    register_merge(sub)  # `ckpt merge`: its parser and handler live with the merging code
    return p


def _writing_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--chunk-bytes", type=parse_size, help="largest stored chunk (default 64MiB)")
    sp.add_argument("--block-bytes", type=parse_size, help="checksum block size (default 4MiB)")
    sp.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at DST (atomically)")


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _exit_code(e: BaseException) -> int:
    from .interop import UnknownFormatError
    from .interop.destination import DestinationError

    usage = (CheckpointNotFoundError, UnknownFormatError, DestinationError, CheckpointExistsError, UsageError)
    if isinstance(e, usage) or isinstance(e, FileNotFoundError):
        return EXIT_USAGE
    return EXIT_FAIL  # damaged input (CorruptChunkError, CheckpointFormatError, ...), I/O, anything else


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckpt`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "quiet"):
        args.quiet = False
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"ckpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:
        if os.environ.get("CKPT_DEBUG"):
            raise
        print(f"ckpt {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return _exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
