"""What every ``ckpt`` command shares: how it registers, exit codes, usage errors, output helpers.

Nothing here imports torch: building the parser (``ckpt --help``) must stay cheap, so each
command imports what it works with inside its handler.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from ..errors import CheckpointError
from ..sizes import parse_size
from ..values import to_json_text

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]

EPILOG = """\
locations are local paths or fsspec URLs (s3://bucket/prefix, memory://...); fsspec reads
credentials and options from its usual environment variables.

exit codes: 0 ok; 1 check failed (corrupt data, damaged manifest, differences, I/O error);
2 usage error, not a checkpoint, or destination in the way.
"""

_COMMON = argparse.ArgumentParser(add_help=False)
_COMMON.add_argument("-q", "--quiet", action="store_true", help="no progress bars or success messages")


class UsageError(CheckpointError):
    """Arguments that do not make sense together."""


def add_command(
    subparsers: argparse._SubParsersAction, name: str, help: str, handler: Handler, description: str | None = None
) -> argparse.ArgumentParser:
    """The one way a command joins ``ckpt``: its parser, with ``-q`` and the shared epilog, and
    ``handler`` (which returns the exit code) as ``args.func``."""
    sp = subparsers.add_parser(
        name,
        help=help,
        description=description or help,
        parents=[_COMMON],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.set_defaults(func=handler)
    return sp


class LazyChoices:
    """Choices argparse reads only when it checks a value or prints the command's help, so that
    building the parser does not import the module (and torch) they come from. Give the argument
    a ``metavar`` (argparse lists choices without one when the argument is added) and name them
    in the help with ``%(choices)s``."""

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load

    def __contains__(self, value: object) -> bool:
        return value in list(self._load())

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._load()))


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return n


def zstd_level(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= n <= 22:
        raise argparse.ArgumentTypeError(f"{text!r}: zstd levels are 1 to 22")
    return n


def compression_options(sp: argparse.ArgumentParser) -> None:
    """``--compress`` / ``--compress-level``: SaveOptions(compression=Compression(level=...))."""
    sp.add_argument("--compress", action="store_true",
                    help="store floating-point chunks byte-grouped and zstd-compressed (as ckpt.save's compression)")
    sp.add_argument("--compress-level", type=zstd_level, metavar="N",
                    help="zstd level, 1 (default) to 22; implies --compress. On floating-point "
                         "weights 1 is the fastest and as small as any: higher levels only cost time")


def compression(args: argparse.Namespace):
    """The ``Compression`` that :func:`compression_options` asked for, or None."""
    from ..options import Compression

    if not (getattr(args, "compress", False) or getattr(args, "compress_level", None)):
        return None
    return Compression(level=args.compress_level or 1)


def writing_options(sp: argparse.ArgumentParser) -> None:
    """The options of commands that write a ckpt checkpoint (convert, reshard)."""
    sp.add_argument("--chunk-bytes", type=parse_size, help="largest stored chunk (default 64MiB)")
    sp.add_argument("--block-bytes", type=parse_size, help="checksum block size (default 4MiB)")
    sp.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at DST (atomically)")
    compression_options(sp)


def save_options(args: argparse.Namespace):
    """The ``SaveOptions`` that :func:`writing_options` asked for."""
    from ..options import SaveOptions

    kw: dict[str, Any] = {"overwrite": getattr(args, "overwrite", False), "compression": compression(args)}
    if getattr(args, "chunk_bytes", None):
        kw["chunk_bytes"] = args.chunk_bytes
    if getattr(args, "block_bytes", None):
        if args.block_bytes % 64:
            raise UsageError("--block-bytes must be a multiple of 64")
        kw["block_bytes"] = args.block_bytes
    return SaveOptions(**kw)


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


def say(args: argparse.Namespace, text: str) -> None:
    """A success message, unless --quiet."""
    if not args.quiet:
        print(text)


def emit_json(doc: Any) -> None:
    """Standard JSON on stdout: non-finite floats and tuples as the format's typed values (FORMAT.md)."""
    sys.stdout.write(to_json_text(doc, indent=2))
    sys.stdout.write("\n")


def table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last column (a key or name) is not padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def timestamp(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t is not None else "-"


def metrics_text(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(m.items())) or "-"


def one_line(e: BaseException) -> str:
    """An error's message folded onto one line (errors are one line on stderr)."""
    text = str(e) or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())
