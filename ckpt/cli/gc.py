"""``ckpt gc``: delete incomplete checkpoints and those no retention rule keeps, remove leftovers inside the
others, abort stale uploads."""

from __future__ import annotations

import argparse
import time

from ..sizes import format_size
from .common import EXIT_OK, UsageError, add_command, emit_json, positive_int, timestamp


def register(subparsers: argparse._SubParsersAction) -> None:
    sp = add_command(
        subparsers,
        "gc",
        "remove incomplete checkpoints and those a retention rule drops (dry run by default)",
        run,
        "Remove, under ROOT, incomplete checkpoints older than the newest complete one, and complete ones "
        "no retention rule keeps. Without a rule every complete checkpoint is kept. The newest complete "
        "checkpoint, the one the `latest` marker names, and damaged ones are never deleted. Inside the checkpoints "
        "it keeps, it removes leftovers no manifest names (data of failed, killed or replaced saves, also partial "
        "ones; staging files): those of aborted saves, and any not modified for --min-age. On S3 it also "
        "aborts unfinished multipart uploads (a killed writer's parts, stored and billed but in no object): "
        "those inside a deleted checkpoint and any older than --abort-uploads-after. Objects that a remaining "
        "checkpoint or a save in flight references (incremental saves) are kept: their checkpoint is retired "
        "(no manifest, just those objects) and freed once nothing references them. Prints what it would "
        "do unless --yes.",
    )
    sp.add_argument("root", metavar="ROOT")
    sp.add_argument("--keep-last", type=positive_int, metavar="N", help="keep the N newest")
    sp.add_argument("--keep-every", type=positive_int, metavar="N", help="keep those whose step is a multiple of N")
    sp.add_argument("--keep-best", type=positive_int, metavar="K", help="keep the K best by --metric")
    sp.add_argument("--metric", help="metric name for --keep-best")
    sp.add_argument("--mode", choices=["min", "max"], default="min", help="best is min (default) or max")
    sp.add_argument(
        "--abort-uploads-after",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="abort multipart uploads started longer ago than this (default 24)",
    )
    sp.add_argument(
        "--min-age",
        type=float,
        default=1.0,
        metavar="HOURS",
        help="remove leftovers inside a checkpoint not modified for this long (default 1; a save in flight is younger)",
    )
    sp.add_argument("--yes", action="store_true", help="really delete")
    sp.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from ..catalog import EntryStatus, abort_upload, collect, open_uploads, plan_gc, scan, stale_uploads, would_retire
    from ..litter import find_litter, remove_litter
    from ..options import RetentionPolicy

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
    now = time.time()
    uploads = stale_uploads(open_uploads(args.root), doomed, now, args.abort_uploads_after * 3600)
    litter = [item for e in entries if e.name not in doomed_names for item in find_litter(e, now, args.min_age * 3600)]
    done = list(doomed)
    retired = {e.name for e in collect(args.root, doomed)} if args.yes else would_retire(args.root, doomed)
    if args.yes:
        remove_litter(args.root, litter)
    for u in uploads if args.yes else ():
        abort_upload(args.root, u)
    if args.json:
        emit_json(
            {
                "dry_run": not args.yes,
                "deleted" if args.yes else "would_delete": [e.to_json() for e in done],
                "retired" if args.yes else "would_retire": sorted(retired),
                "kept": [e.to_json() for e in entries if e.name not in doomed_names],
                "aborted_uploads" if args.yes else "would_abort_uploads": [u.to_json() for u in uploads],
                "removed_litter" if args.yes else "would_remove_litter": [item.to_json() for item in litter],
            }
        )
        return EXIT_OK
    verb = "deleted" if args.yes else "would delete"
    for e in done:
        why = "retention" if e.status is EntryStatus.COMPLETE else "incomplete"
        step = e.step if e.step is not None else "-"
        kept = "; keeping the objects later checkpoints reference (retired)" if e.name in retired else ""
        print(f"{verb}  {e.name}  (step {step}, {format_size(e.size)}, {why}{kept})")
    for u in uploads:
        print(f"{'aborted' if args.yes else 'would abort'}  upload of {u.key}  (started {timestamp(u.started)})")
    for item in litter:
        print(f"{'removed' if args.yes else 'would remove'}  {item.path}  ({format_size(item.size)}, {item.why})")
    freed = sum(e.size for e in done) + sum(item.size for item in litter)
    kept = len(entries) - len(done)
    print(f"{verb} {len(done)} checkpoint(s), {format_size(freed)}; kept {kept}")
    if litter:
        print(f"{'removed' if args.yes else 'would remove'} {len(litter)} leftover file(s) inside kept checkpoints")
    if (done or uploads or litter) and not args.yes:
        print("dry run: nothing was deleted; pass --yes to delete")
    return EXIT_OK
