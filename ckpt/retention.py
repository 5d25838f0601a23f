"""Which checkpoints a retention policy keeps: a pure function of their facts.

Kept apart from deleting so it is tested without storage, and so the CLI's
``gc`` and the training-loop ``Manager`` apply one rule.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointInfo:
    """What retention needs to know of one checkpoint under a root."""

    name: str
    step: int | None
    committed: bool
    created: float | None = None  # seconds since the epoch
    metrics: tuple[tuple[str, float], ...] = ()

    def metric(self, name: str) -> float | None:
        return dict(self.metrics).get(name)


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep a committed checkpoint if any rule keeps it; the newest is always kept.

    keep_last: the N newest. keep_best: the K best by ``best_metric`` (``best_mode``
    "min" or "max"; checkpoints without the metric never count as best).
    keep_every: those whose step is a multiple of N. keep_within_s: those younger
    than this. A policy with no rule keeps everything.
    """

    keep_last: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"
    keep_every: int | None = None
    keep_within_s: float | None = None

    def __post_init__(self) -> None:
        if self.keep_best and not self.best_metric:
            raise ValueError("keep_best needs best_metric")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', not {self.best_mode!r}")

    @property
    def keeps_all(self) -> bool:
        return not any((self.keep_last, self.keep_best, self.keep_every, self.keep_within_s))


def order_key(c: CheckpointInfo) -> tuple:
    """Newest first: by step, then creation time, then name."""
    return (c.step if c.step is not None else -1, c.created or 0.0, c.name)


def select_deletions(
    checkpoints: list[CheckpointInfo], policy: RetentionPolicy, now: float, in_flight: frozenset[str] = frozenset()
) -> list[str]:
    """Names to delete: committed ones no rule keeps, and incomplete ones older
    than the newest committed checkpoint (abandoned saves). Never the newest
    committed one, never a save still in flight."""
    committed = sorted((c for c in checkpoints if c.committed), key=order_key, reverse=True)
    if not committed:
        return []
    newest = committed[0]
    doomed = [
        c.name for c in checkpoints if not c.committed and c.name not in in_flight and order_key(c) < order_key(newest)
    ]
    if policy.keeps_all:
        return sorted(doomed)
    keep = {newest.name}
    if policy.keep_last:
        keep.update(c.name for c in committed[: policy.keep_last])
    if policy.keep_best:
        scored = [c for c in committed if c.metric(policy.best_metric) is not None]
        sign = 1.0 if policy.best_mode == "min" else -1.0
        scored.sort(key=lambda c: (sign * c.metric(policy.best_metric), -order_key(c)[0]))
        keep.update(c.name for c in scored[: policy.keep_best])
    if policy.keep_every:
        keep.update(c.name for c in committed if c.step is not None and c.step % policy.keep_every == 0)
    if policy.keep_within_s is not None:
        keep.update(c.name for c in committed if c.created is not None and now - c.created <= policy.keep_within_s)
    doomed.extend(c.name for c in committed if c.name not in keep and c.name not in in_flight)
    return sorted(doomed)
