"""How much each checkpoint weighs: pure functions of what the manifests record.

A method sees the sources as a *series* (ordered by step when every source
records one, else in the order given) and returns one weight per source in that
order. Nothing here reads tensors, so every rule is unit-tested directly.
Methods are looked up by name in a registry, so a project can add its own with
:func:`register_method`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import WeightError

SUM_TOLERANCE = 1e-6  # explicit weights must sum to 1 within this (relative to their scale)


@dataclass(frozen=True)
class MergeSourceInfo:
    """What a method may know of one source: its place in the caller's list, step, metrics."""

    position: int
    uri: str
    step: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


class Method(ABC):
    """A rule that turns a series of checkpoints into linear-combination weights."""

    name: ClassVar[str] = ""

    @abstractmethod
    def weights(self, series: Sequence[MergeSourceInfo]) -> list[float]:
        """One weight per source, aligned with ``series``."""

    def to_json(self) -> dict[str, Any]:
        """The method and its options, as recorded in the output's metadata."""
        return {"method": self.name}


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``ckpt.merge(..., method=cls.name)``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty `name`")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def make_method(method: str | Method, **options: Any) -> Method:
    """A method instance from its registered name and options (or the instance itself)."""
    if isinstance(method, Method):
        if options:
            raise TypeError(f"options {sorted(options)} given with a method instance; set them on the instance")
        return method
    try:
        cls = _REGISTRY[method]
    except KeyError:
        raise ValueError(f"unknown merge method {method!r}; known: {', '.join(method_names())}") from None
    try:
        return cls(**options)
    except TypeError as e:
        raise TypeError(f"merge method {method!r}: {e}") from None


def check_weights(weights: Sequence[float], n: int, who: str) -> list[float]:
    """Weights any method returns must be n finite numbers."""
    w = [float(x) for x in weights]
    if len(w) != n:
        raise WeightError(f"{who}: {len(w)} weights for {n} sources")
    bad = [i for i, x in enumerate(w) if not math.isfinite(x)]
    if bad:
        raise WeightError(f"{who}: non-finite weight(s) at position(s) {bad}: {[w[i] for i in bad]}")
    return w


@register_method
class Uniform(Method):
    """The plain average (model soup / checkpoint averaging)."""

    name = "uniform"

    def weights(self, series: Sequence[MergeSourceInfo]) -> list[float]:
        return [1.0 / len(series)] * len(series)


@register_method
class Explicit(Method):
    """Weights given by the caller, in the order the sources were given.

    They must sum to 1 unless ``normalize`` (divide by their sum) or
    ``require_sum_one=False`` (task-arithmetic style); negative weights need
    ``allow_negative``.
    """

    name = "explicit"

    def __init__(
        self,
        weights: Sequence[float],
        normalize: bool = False,
        allow_negative: bool = False,
        require_sum_one: bool = True,
    ) -> None:
        self.given = [float(x) for x in weights]
        self.normalize, self.allow_negative, self.require_sum_one = normalize, allow_negative, require_sum_one

    def weights(self, series: Sequence[MergeSourceInfo]) -> list[float]:
        w = check_weights(self.given, len(series), "explicit weights")
        negative = [i for i, x in enumerate(w) if x < 0]
        if negative and not self.allow_negative:
            raise WeightError(
                f"explicit weights: negative weight(s) at position(s) {negative} ({[w[i] for i in negative]}); "
                "pass allow_negative=True to extrapolate"
            )
        total = math.fsum(w)
        if self.normalize:
            if total == 0 or not math.isfinite(1 / total):
                raise WeightError(f"explicit weights: sum is {total}, cannot normalize")
            w = [x / total for x in w]
        elif self.require_sum_one and abs(total - 1.0) > SUM_TOLERANCE * max(1.0, *map(abs, w)):
            raise WeightError(
                f"explicit weights sum to {total!r}, not 1; pass normalize=True to rescale them "
                "or require_sum_one=False to keep them as they are"
            )
        return [w[s.position] for s in series]

    def to_json(self) -> dict[str, Any]:
        return {"method": self.name, "weights": self.given, "normalize": self.normalize}


def ema_weights(n: int, decay: float) -> list[float]:
    """Weights of ``e_0 = x_0; e_k = decay * e_{k-1} + (1 - decay) * x_k`` after ``n`` terms.

    ``w_0 = decay^(n-1)``, ``w_k = (1 - decay) * decay^(n-1-k)`` for k >= 1: they sum
    to 1, and the weights of k >= 1 grow geometrically towards the latest checkpoint.
    """
    if not (0.0 <= decay < 1.0):
        raise WeightError(f"EMA decay must be in [0, 1), got {decay!r}")
    w = [(1.0 - decay) * decay ** (n - 1 - k) for k in range(n)]
    w[0] = decay ** (n - 1)
    return w


@register_method
class EMA(Method):
    """Exponential moving average over the series (oldest first), one decay per checkpoint."""

    name = "ema"

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = float(decay)

    def weights(self, series: Sequence[MergeSourceInfo]) -> list[float]:
        return ema_weights(len(series), self.decay)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.name, "decay": self.decay}


def mwa_weights(values: Sequence[float], penalty: float, higher_is_better: bool = False) -> list[float]:
    """Metrics-weighted averaging: ``w_i ∝ exp(-penalty * z_i)``.

    ``z_i = (m_i - best) / (worst - best)`` in [0, 1] is how far checkpoint i is
    from the best one, relative to the spread of the series (0 when all are equal).
    So ``penalty = 0`` is uniform, the best checkpoint weighs ``e^penalty`` times the
    worst whatever the metric's unit, weights never decrease as the metric improves,
    they sum to 1, and ``penalty -> inf`` puts all weight on the best (ties share it).
    """
    if math.isnan(penalty) or penalty < 0:
        raise WeightError(f"MWA penalty factor must be >= 0, got {penalty!r}")
    m = [float(v) for v in values]
    if not m:
        raise WeightError("MWA needs at least one source")
    if higher_is_better:
        m = [-v for v in m]
    best, worst = min(m), max(m)
    spread = worst - best
    if spread == 0 or not math.isfinite(spread):
        z = [0.0 if v == best else 1.0 for v in m]
    else:
        z = [(v - best) / spread for v in m]
    if math.isinf(penalty):
        raw = [1.0 if zi == 0.0 else 0.0 for zi in z]
    else:
        raw = [math.exp(-penalty * zi) for zi in z]
    total = math.fsum(raw)
    return [r / total for r in raw]


@register_method
class MWA(Method):
    """Metrics-weighted averaging by a metric recorded at save (``metrics={...}``) or by step.

    ``metric=None`` weighs by step (later is better); a metric is lower-is-better
    unless ``higher_is_better``. See :func:`mwa_weights` and docs/MERGING.md.
    """

    name = "mwa"

    def __init__(self, metric: str | None = None, penalty: float = 1.0, higher_is_better: bool | None = None) -> None:
        self.metric = metric
        self.penalty = float(penalty)
        self.higher_is_better = (metric is None) if higher_is_better is None else bool(higher_is_better)

    def values(self, series: Sequence[MergeSourceInfo]) -> list[float]:
        out = []
        for s in series:
            if self.metric is None:
                if s.step is None:
                    raise WeightError(f"MWA by step: {s.uri} records no step; pass metric=<name> instead")
                v = float(s.step)
            else:
                if self.metric not in s.metrics:
                    have = ", ".join(sorted(s.metrics)) or "none"
                    raise WeightError(f"MWA: {s.uri} records no metric {self.metric!r} (it has: {have})")
                v = float(s.metrics[self.metric])
            if not math.isfinite(v):
                raise WeightError(f"MWA: {s.uri}: {self.metric or 'step'} is {v}, not a finite number")
            out.append(v)
        return out

    def weights(self, series: Sequence[MergeSourceInfo]) -> list[float]:
        return mwa_weights(self.values(series), self.penalty, self.higher_is_better)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "metric": self.metric or "step",
            "penalty": self.penalty,
            "higher_is_better": self.higher_is_better,
        }


@register_method
class TaskArithmetic(Method):
    """``theta = theta_base + scale * sum_i (theta_i - theta_base)`` over the other sources.

    ``pretrained`` is the base model's position in the list the sources were given in.
    As weights: ``scale`` for every other source and ``1 - scale * (N - 1)`` for the base
    (they sum to 1; the base's may be negative).
    """

    name = "task_arithmetic"

    def __init__(self, pretrained: int = 0, scale: float = 1.0) -> None:
        self.pretrained, self.scale = int(pretrained), float(scale)

    def weights(self, series: Sequence[MergeSourceInfo]) -> list[float]:
        n = len(series)
        if n < 2:
            raise WeightError("task arithmetic needs a base model and at least one fine-tuned model")
        if not -n <= self.pretrained < n:
            raise WeightError(f"task arithmetic: pretrained={self.pretrained}, but there are {n} sources")
        if not math.isfinite(self.scale):
            raise WeightError(f"task arithmetic: scale must be finite, got {self.scale}")
        base = self.pretrained % n
        return [1.0 - self.scale * (n - 1) if s.position == base else self.scale for s in series]

    def to_json(self) -> dict[str, Any]:
        return {"method": self.name, "pretrained": self.pretrained, "scale": self.scale}
