"""``ckpt``: inspect, verify, compare, convert, export, reshard, merge and clean up checkpoints.

Each command is a module of this package with ``register(subparsers)``, which adds its parser
through :func:`common.add_command` and sets its handler; :func:`main` parses and dispatches.
Building the parser imports no torch: handlers import what they work with.

Exit codes scripts can rely on:
  0  success (verify: every checksum matches; diff: no difference)
  1  the check failed or the input is damaged: corrupt chunk, unreadable manifest,
     differences found, I/O failure
  2  usage error, or an input that is not a checkpoint / a destination that is in the way
Errors are one line on stderr; a failing command leaves its destination as it was.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import CheckpointExistsError, CheckpointNotFoundError
from . import convert, diff, export, gc, info, ls, merge, reshard, verify
from .common import EPILOG, EXIT_FAIL, EXIT_OK, EXIT_USAGE, UsageError, one_line

COMMANDS = (ls, info, verify, diff, convert, export, reshard, gc, merge)  # in the order --help lists them

__all__ = ["COMMANDS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ckpt",
        description="Inspect, verify, compare, convert, export, reshard and clean up PyTorch checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"ckpt {__version__}")
    subparsers = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return p


def _exit_code(e: BaseException) -> int:
    from ..interop import UnknownFormatError
    from ..interop.destination import DestinationError
    from ..interop.hf_model import ModelConfigError
    from ..interop.view import SelectionError

    usage = (CheckpointNotFoundError, UnknownFormatError, DestinationError, CheckpointExistsError, UsageError)
    usage += (SelectionError, ModelConfigError)
    if isinstance(e, usage) or isinstance(e, FileNotFoundError):
        return EXIT_USAGE
    return EXIT_FAIL  # damaged input (CorruptChunkError, CheckpointFormatError, ...), I/O, anything else


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckpt`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
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
        print(f"ckpt {args.command}: error: {one_line(e)}", file=sys.stderr)
        return _exit_code(e)
