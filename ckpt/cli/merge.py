"""``ckpt merge``: the command-line face of :func:`ckpt.merge` (weighted streaming merges)."""

from __future__ import annotations

import argparse
import glob
import json
from typing import Any

from ..errors import CheckpointError
from ..sizes import parse_size
from .common import EXIT_OK, LazyChoices, UsageError, add_command, compression, compression_options


def _method_names() -> list[str]:
    from ..merge.methods import method_names

    return method_names()


def _formats() -> tuple[str, ...]:
    from ..merge.driver import FORMATS

    return FORMATS


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "merge",
        "average / weigh / search a combination of checkpoints (streaming)",
        run,
        "Merge checkpoints: every floating tensor of the output is sum_i w_i * theta_i. "
        "Non-floating tensors and JSON values come from the base source (default: the latest). "
        "See docs/MERGING.md.",
    )
    p.add_argument("sources", nargs="+", help="checkpoints (globs are expanded, also for s3:// and other URLs)")
    p.add_argument("-o", "--output", required=True, help="where to write the merged checkpoint")
    p.add_argument(
        "--method",
        default="uniform",
        choices=LazyChoices(_method_names),
        metavar="METHOD",
        help="weighting: %(choices)s (default: %(default)s)",
    )
    p.add_argument("--weights", help="explicit: comma-separated weights, in the order of the sources")
    p.add_argument("--normalize", action="store_true", help="explicit: divide the weights by their sum")
    p.add_argument("--allow-negative", action="store_true", help="explicit: allow negative weights")
    p.add_argument("--decay", type=float, help="ema: decay per checkpoint, in [0, 1) (default 0.9)")
    p.add_argument("--metric", help="mwa / lcsc: metric recorded at save (default for mwa: weigh by step)")
    p.add_argument("--higher-is-better", action="store_true", help="mwa / lcsc: the metric is a score, not a loss")
    p.add_argument("--penalty", type=float, help="mwa: penalty factor >= 0 (0 = uniform; default 1)")
    p.add_argument("--eval", dest="evaluate", help="lcsc: module:function taking a state dict, lower is better")
    p.add_argument("--budget", type=int, help="lcsc: number of evaluations (default 100)")
    p.add_argument("--seed", type=int, help="lcsc: random seed (default 0)")
    p.add_argument(
        "--option", action="append", type=_option, default=[], metavar="KEY=VALUE", help="any other method option"
    )
    p.add_argument(
        "--format",
        dest="output_format",
        default="ckpt",
        choices=LazyChoices(_formats),
        metavar="FORMAT",
        help="output format: %(choices)s (default: %(default)s)",
    )
    p.add_argument("--max-shard-size", type=parse_size, help="hf: largest shard, e.g. 5GB (default: one file)")
    p.add_argument("--dtype", help="output dtype of merged tensors: fp32, bf16, fp16, ... (default: as stored)")
    p.add_argument("--base", help="source giving non-floating tensors and values: index or URI (default: latest)")
    p.add_argument("--include", action="append", help="glob on flat keys to keep (repeatable)")
    p.add_argument("--exclude", action="append", help="glob on flat keys to drop (repeatable)")
    p.add_argument("--chunk-size", type=parse_size, default=16 << 20, help="output chunk size (default 16MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    compression_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def expand_sources(patterns: list[str]) -> list[str]:
    """Expand globs the shell did not (URLs, quoted patterns); keep the rest as given."""
    out: list[str] = []
    for pat in patterns:
        if not glob.has_magic(pat):
            out.append(pat)
            continue
        if "://" in pat:
            import fsspec

            fs, _, paths = fsspec.get_fs_token_paths(pat)
            matches = sorted(fs.unstrip_protocol(p) for p in paths)
        else:
            matches = sorted(glob.glob(pat))
        if not matches:
            raise CheckpointError(f"{pat!r} matches nothing")
        out.extend(matches)
    return out


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.weights is not None:
        try:
            opts["weights"] = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise CheckpointError(f"--weights {args.weights!r}: expected comma-separated numbers") from None
    if args.normalize:
        opts["normalize"] = True
    if args.allow_negative:
        opts["allow_negative"] = True
    for name in ("decay", "metric", "penalty", "evaluate", "budget", "seed"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.higher_is_better:
        opts["higher_is_better"] = True
    opts.update(dict(args.option))
    return opts


def run(args: argparse.Namespace) -> int:
    """Handler of ``ckpt merge``. Failures raise, and the CLI's entry point gives the exit code
    as for every command: 2 for a usage error (bad options or weights, a missing source, an
    existing output), 1 for any other (mismatched or damaged sources, a failing evaluation, I/O)."""
    from ..merge.driver import merge

    try:
        sources = expand_sources(args.sources)
        base: int | str | None = args.base
        if base is not None and base.lstrip("-").isdigit():
            base = int(base)
        result = merge(
            sources,
            args.output,
            args.method,
            output_format=args.output_format,
            dtype=args.dtype,
            base=base,
            include=args.include,
            exclude=args.exclude,
            overwrite=args.overwrite,
            chunk_bytes=args.chunk_size,
            compression=compression(args),
            max_shard_bytes=args.max_shard_size,
            progress=not (args.no_progress or args.quiet),
            **_method_options(args),
        )
    except (TypeError, ValueError) as e:  # bad options or weights: how it was asked
        raise UsageError(str(e)) from e
    if args.quiet:
        return EXIT_OK
    width = max(len(u) for u in result.weights)
    for uri, w in result.weights.items():
        print(f"  {uri:<{width}}  {w:+.6f}")
    search = result.record.get("search")
    if search:
        print(f"lcsc: best {search['best']} fitness {search['fitness']:.6g} after {search['evaluations']} evaluations")
    print(
        f"merged {len(result.weights)} checkpoints ({result.record['method']}) into {result.uri} "
        f"in {result.seconds:.1f}s"
    )
    return EXIT_OK
