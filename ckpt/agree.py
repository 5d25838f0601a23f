"""Ranks fail together: one gather of each rank's error, one error of the same type on every rank.

A rank that raised alone would leave the others waiting in their next collective. Each
rank's outcome travels as a small record (type name, message, mismatch lines); every rank
then raises the same error type it would raise in one process (``CheckpointExistsError``
for an existing checkpoint, ``StateDictMismatchError`` for a mismatch), naming every
failing rank and its reason.
"""

from __future__ import annotations

import builtins
from typing import Any

from . import errors
from .errors import CheckpointError, StateDictMismatchError

Record = dict[str, Any]


def record(error: BaseException | None) -> Record | None:
    """What a rank sends about its outcome (None: it succeeded)."""
    if error is None:
        return None
    found = {"type": type(error).__name__, "message": str(error)}
    for name in ("problems", "missing_keys", "unexpected_keys"):
        found[name] = getattr(error, name, None)
    return found


def _class(name: str) -> type[BaseException]:
    cls = getattr(errors, name, None) or getattr(builtins, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, Exception) else CheckpointError


def rebuilt(rec: Record) -> BaseException:
    """The error one rank's record describes, raised on a rank that only received it: the same type
    where it is built from a message (``CheckpointError`` otherwise)."""
    try:
        return _class(rec["type"])(rec["message"])
    except TypeError:  # a class whose constructor takes more than a message
        return CheckpointError(rec["message"])


def combined(records: list[Record | None], what: str) -> BaseException | None:
    """The error every rank raises for the gathered ``records`` (None if all succeeded).

    One type when every failing rank raised the same one (``CheckpointError`` otherwise);
    the message names each failing rank with its reason.
    """
    failed = [(rank, r) for rank, r in enumerate(records) if r is not None]
    if not failed:
        return None
    names = {r["type"] for _, r in failed}
    cls = _class(names.pop()) if len(names) == 1 else CheckpointError
    ranks = ", ".join(str(rank) for rank, _ in failed)
    if cls is StateDictMismatchError:
        problems = [f"rank {rank}: {p}" for rank, r in failed for p in (r["problems"] or [r["message"]])]
        rank0, lines = failed[0][0], failed[0][1]["message"].splitlines()
        hints = [line.removeprefix("hint: ") for line in lines[1:2] if line.startswith("hint: ")]
        return StateDictMismatchError(
            problems,
            summary=f"{what} failed on rank(s) {ranks}; rank {rank0}: {lines[0] if lines else ''}",
            hint=hints[0] if hints else "",
            missing_keys=sorted({k for _, r in failed for k in r.get("missing_keys") or []}),
            unexpected_keys=sorted({k for _, r in failed for k in r.get("unexpected_keys") or []}),
        )
    lines = "\n  ".join(f"rank {rank}: {r['type']}: {r['message']}" for rank, r in failed)
    message = f"{what} failed on rank(s) {ranks}:\n  {lines}"
    try:
        return cls(message)
    except TypeError:  # a class whose constructor takes more than a message
        return CheckpointError(message)


def gather(error: BaseException | None, group: Any = None) -> list[Record | None]:
    """Every rank's record, by rank (one ``all_gather_object`` of a few hundred bytes)."""
    import torch.distributed as dist

    out: list[Record | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, record(error), group=group)
    return out


def distributed(group: Any = None) -> bool:
    """Whether more than one rank takes part (torch.distributed initialized, world > 1)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def raise_together(error: BaseException | None, what: str, group: Any = None) -> None:
    """Raise on every rank if any rank failed; the failing ranks chain their own error."""
    if not distributed(group):
        if error is not None:
            raise error
        return
    found = combined(gather(error, group), what)
    if found is not None:
        raise found from error
