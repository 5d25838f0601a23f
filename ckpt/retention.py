"""Which checkpoints a retention policy keeps: a pure function of their facts.

Kept apart from deleting so it is tested without storage, and so the CLI's
``gc`` and the training-loop ``Manager`` apply one rule. The policy itself is an
option (:class:`ckpt.options.RetentionPolicy`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .options import BestMode, RetentionPolicy


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
        sign = 1.0 if policy.best_mode is BestMode.MIN else -1.0
        scored.sort(key=lambda c: (sign * c.metric(policy.best_metric), -order_key(c)[0]))
        keep.update(c.name for c in scored[: policy.keep_best])
    if policy.keep_every:
        keep.update(c.name for c in committed if c.step is not None and c.step % policy.keep_every == 0)
    if policy.keep_within_s is not None:
        keep.update(c.name for c in committed if c.created is not None and now - c.created <= policy.keep_within_s)
    doomed.extend(c.name for c in committed if c.name not in keep and c.name not in in_flight)
    return sorted(doomed)
