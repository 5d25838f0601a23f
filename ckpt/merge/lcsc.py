"""LCSC: search linear-combination coefficients of saved checkpoints by evolution.

The coefficients sum to 1 and may be negative. Fitness is a user callable
(lower is better) applied to the merged state dict, within an evaluation
budget. The search starts from the usual recipes (each checkpoint alone, the
uniform average, EMA series, MWA weights), so the best it returns is never
worse on the search metric than any of them; then a (mu + lambda) evolution
strategy (recombination along the line through two parents, Gaussian steps in
the sum-zero subspace, a 1/5-success rule for the step size) spends the rest.
Deterministic for a seed (given a deterministic fitness).
"""

from __future__ import annotations

import importlib
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import EvaluationError, MergeError
from .methods import MWA, MergeSourceInfo, Method, ema_weights, register_method

Build = Callable[[Sequence[float]], dict[str, torch.Tensor]]


def resolve_callable(spec: str | Callable[..., Any]) -> Callable[..., Any]:
    """``"package.module:function"`` (importable, or from the current directory) or a callable."""
    if callable(spec):
        return spec
    module, sep, attr = str(spec).partition(":")
    if not sep or not module or not attr:
        raise MergeError(f"evaluation {spec!r}: expected 'module:function'")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0] or os.getcwd() in sys.path:
            raise MergeError(f"evaluation {spec!r}: cannot import {module!r} ({e})") from e
        sys.path.insert(0, os.getcwd())  # like `python -m`: the working directory is importable
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e2:
            raise MergeError(f"evaluation {spec!r}: cannot import {module!r} ({e2})") from e2
    fn = mod
    for part in attr.split("."):
        try:
            fn = getattr(fn, part)
        except AttributeError:
            raise MergeError(f"evaluation {spec!r}: {module} has no {attr!r}") from None
    if not callable(fn):
        raise MergeError(f"evaluation {spec!r} is not callable")
    return fn


def _fmt(c: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in c) + "]"


class SearchMethod(Method):
    """A method whose weights come from evaluating candidates (the driver calls :meth:`search`)."""

    def weights(self, series: Sequence[MergeSourceInfo]) -> list[float]:
        raise MergeError(f"method {self.name!r} searches: call it through ckpt.merge(...)")

    def search(
        self, series: Sequence[MergeSourceInfo], build: Build, progress: bool = False
    ) -> tuple[list[float], dict[str, Any]]:
        """Weights (aligned with ``series``) and a JSON record of the search."""
        raise NotImplementedError


@register_method
class LCSC(SearchMethod):
    """Evolutionary search of coefficients; see the module docstring and docs/MERGING.md.

    evaluate: ``"module:function"`` or a callable taking the merged state dict
      (flat keys as stored -> tensors) and returning a float, lower is better.
    budget: evaluations in all, the starting population included.
    metric: also seed the search with MWA weights from this recorded metric.
    max_abs: no coefficient's magnitude exceeds this (keeps extrapolation sane).
    cache_bytes: hold the sources in memory when they fit (else each candidate streams).
    """

    name = "lcsc"

    def __init__(
        self,
        evaluate: str | Callable[[dict[str, torch.Tensor]], float],
        budget: int = 100,
        seed: int = 0,
        metric: str | None = None,
        higher_is_better: bool = False,
        max_abs: float = 3.0,
        cache_bytes: int = 2 << 30,
    ) -> None:
        self.spec = evaluate if isinstance(evaluate, str) else getattr(evaluate, "__qualname__", repr(evaluate))
        self.fn = resolve_callable(evaluate)
        if int(budget) < 1:
            raise MergeError(f"LCSC budget must be >= 1, got {budget}")
        if not max_abs >= 1.0:
            raise MergeError(f"LCSC max_abs must be >= 1 (one-hot candidates need it), got {max_abs}")
        self.budget, self.seed, self.metric = int(budget), int(seed), metric
        self.higher_is_better, self.max_abs, self.cache_bytes = higher_is_better, float(max_abs), int(cache_bytes)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.name, "evaluate": self.spec, "budget": self.budget, "seed": self.seed}

    def starting_points(self, series: Sequence[MergeSourceInfo]) -> list[tuple[str, list[float]]]:
        """The recipes the search must beat: uniform, MWA, EMA series, each checkpoint alone."""
        n = len(series)
        pts: list[tuple[str, list[float]]] = [("uniform", [1.0 / n] * n)]
        if self.metric is not None:
            for pf in (1.0, 4.0):
                m = MWA(self.metric, pf, self.higher_is_better)
                pts.append((f"mwa:{self.metric}:pf={pf:g}", m.weights(series)))
        if all(s.step is not None for s in series):
            pts.append(("mwa:step:pf=2", MWA(None, 2.0).weights(series)))
        for decay in (0.5, 0.8):
            pts.append((f"ema:{decay:g}", ema_weights(n, decay)))
        for i, s in enumerate(series):
            pts.append((f"single:{i} (step {s.step})" if s.step is not None else f"single:{i}", _onehot(n, i)))
        out, seen = [], set()
        for label, c in pts:
            k = _key(c)
            if k not in seen:
                seen.add(k)
                out.append((label, c))
        return out

    def search(
        self, series: Sequence[MergeSourceInfo], build: Build, progress: bool = False
    ) -> tuple[list[float], dict[str, Any]]:
        from tqdm.auto import tqdm

        n = len(series)
        start = self.starting_points(series)
        if self.budget < len(start):
            raise MergeError(
                f"LCSC budget {self.budget} is smaller than its starting population ({len(start)}: "
                f"{', '.join(label for label, _ in start)}); raise the budget"
            )
        rng = random.Random(self.seed)
        seen: dict[tuple, float] = {}
        trace: list[float] = []
        best: tuple[float, list[float], str] = (math.inf, [], "")
        bar = tqdm(total=self.budget, desc="lcsc", unit="eval", disable=not progress, leave=False)

        def evaluate(label: str, c: list[float]) -> float:
            nonlocal best
            k = _key(c)
            if k in seen:
                return seen[k]
            state = build(c)
            try:
                raw = self.fn(state)
            except Exception as e:
                raise EvaluationError(
                    f"evaluating LCSC candidate {label} (coefficients {_fmt(c)}) with {self.spec} failed: "
                    f"{type(e).__name__}: {e}"
                ) from e
            try:
                value = float(raw)
            except (TypeError, ValueError, RuntimeError):
                raise EvaluationError(
                    f"LCSC candidate {label} (coefficients {_fmt(c)}): {self.spec} returned {raw!r}, not a number"
                ) from None
            if not math.isfinite(value):
                raise EvaluationError(
                    f"LCSC candidate {label} (coefficients {_fmt(c)}): {self.spec} returned {value}, not finite"
                )
            seen[k] = value
            if value < best[0]:
                best = (value, list(c), label)
            trace.append(best[0])
            bar.update(1)
            bar.set_postfix(best=f"{best[0]:.5g}")
            return value

        try:
            baselines = {label: evaluate(label, c) for label, c in start}
            pop = sorted(((f, c) for (_, c), f in zip(start, baselines.values())), key=lambda p: p[0])
            mu = max(2, min(8, n))
            pop = pop[:mu]
            sigma = 0.5 / n
            gen = 0
            stalls = 0
            while len(seen) < self.budget and stalls < 20:
                gen += 1
                lam = min(self.budget - len(seen), max(4, n))
                children = []
                for j in range(lam):
                    a = pop[min(len(pop) - 1, int(len(pop) * rng.random() ** 2))]
                    c = list(a[1])
                    if len(pop) > 1 and rng.random() < 0.5:
                        b = pop[rng.randrange(len(pop))]
                        t = rng.uniform(-0.5, 1.5)
                        c = [x + t * (y - x) for x, y in zip(c, b[1])]
                    z = [rng.gauss(0.0, 1.0) for _ in range(n)]
                    zm = math.fsum(z) / n
                    c = self._project([x + sigma * (zi - zm) for x, zi in zip(c, z)])
                    children.append((f"es:{gen}.{j}", c, a[0]))
                before = len(seen)
                results = []
                for label, c, parent in children:
                    if len(seen) >= self.budget:
                        break
                    results.append((evaluate(label, c), c, parent))
                stalls = stalls + 1 if len(seen) == before else 0
                wins = sum(f < parent for f, _, parent in results)
                rate = wins / max(1, len(results))
                sigma = min(2.0, max(1e-6, sigma * math.exp(1.5 * (rate - 0.2))))
                merged = {_key(c): (f, c) for f, c in pop}
                for f, c, _ in results:
                    merged.setdefault(_key(c), (f, c))
                pop = sorted(merged.values(), key=lambda p: p[0])[:mu]
        finally:
            bar.close()

        value, coeffs, label = best
        record = {
            **self.to_json(),
            "fitness": value,
            "best": label,
            "coefficients": [{"uri": s.uri, "step": s.step, "coefficient": c} for s, c in zip(series, coeffs)],
            "evaluations": len(seen),
            "baselines": baselines,
            "trace": trace,
        }
        return coeffs, record

    def _project(self, c: list[float]) -> list[float]:
        """Back onto sum(c) = 1, then shrink towards uniform until every |c_i| <= max_abs."""
        n = len(c)
        shift = (math.fsum(c) - 1.0) / n
        c = [x - shift for x in c]
        u = 1.0 / n
        worst = max(abs(x) for x in c)
        if worst > self.max_abs:
            # largest s with |u + s (x - u)| <= max_abs for all i
            s = min((self.max_abs - u) / (x - u) if x > u else (self.max_abs + u) / (u - x) for x in c if x != u)
            c = [u + s * (x - u) for x in c]
        return c


def _onehot(n: int, i: int) -> list[float]:
    c = [0.0] * n
    c[i] = 1.0
    return c


def _key(c: Sequence[float]) -> tuple:
    return tuple(round(x, 12) + 0.0 for x in c)
