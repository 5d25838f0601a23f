"""Errors a merge raises on purpose (all are :class:`ckpt.CheckpointError`)."""

from __future__ import annotations

from ..errors import CheckpointError


class MergeError(CheckpointError):
    """A merge could not be done as asked."""


class SourceMismatchError(MergeError):
    """The sources do not hold the same tensors (lists every problem, naming key and source)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} mismatch(es) between the sources:\n  " + "\n  ".join(shown) + more)


class WeightError(MergeError, ValueError):
    """Weights that do not fit the sources (count, sum, sign, non-finite)."""


class EvaluationError(MergeError):
    """A candidate's evaluation raised or returned a non-finite value."""
