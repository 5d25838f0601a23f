"""The checkpoints a merge reads: open them, order them, check they hold the same tensors.

Three orders matter and are kept apart:

- the caller's order (explicit weights and ``base=<int>`` refer to it);
- the *series* order (by step when every source records one, else the caller's),
  which EMA and MWA-by-step see;
- the *summation* order (by URI), so the arithmetic, and so the result bit for bit,
  does not depend on the order the caller listed the sources in.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..options import LoadOptions
from ..reader import CheckpointReader
from .errors import MergeError, SourceMismatchError
from .methods import MergeSourceInfo

_DTYPE_ALIASES = {
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16``, ``"bf16"``, ``"bfloat16"``, ... (None: keep each tensor's dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ValueError(f"output dtype must be a floating dtype, got {dtype}")
        return dtype
    try:
        return _DTYPE_ALIASES[dtype.lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPE_ALIASES))}") from None


@dataclass
class MergeSource:
    """One opened source of a merge: its reader, and what weighting methods may know of it."""

    reader: CheckpointReader
    info: MergeSourceInfo

    @property
    def uri(self) -> str:
        return self.info.uri


def open_sources(uris: Sequence[str], load_options: LoadOptions | None = None) -> list[MergeSource]:
    """Open every source (manifests only), in the caller's order."""
    if not uris:
        raise MergeError("no sources to merge")
    seen: dict[str, str] = {}
    out = []
    for i, uri in enumerate(uris):
        opts = load_options or LoadOptions(io_threads=1)
        reader = CheckpointReader(uri, opts)
        where = f"{reader.storage.fs.protocol}:{reader.storage.root}"
        if where in seen:
            raise MergeError(f"source {uri!r} is given twice (also as {seen[where]!r})")
        seen[where] = uri
        m = reader.manifest
        out.append(MergeSource(reader, MergeSourceInfo(i, uri, m.step, dict(m.metrics))))
    return out


def series_order(sources: Sequence[MergeSource]) -> list[MergeSource]:
    """By step (ties keep the caller's order) when every source records a step."""
    if all(s.info.step is not None for s in sources):
        return sorted(sources, key=lambda s: (s.info.step, s.info.position))
    return list(sources)


def summation_order(sources: Sequence[MergeSource]) -> list[MergeSource]:
    return sorted(sources, key=lambda s: (s.uri, s.reader.manifest.save_id))


def pick_base(sources: Sequence[MergeSource], base: int | str | None) -> MergeSource:
    """The source whose JSON values and non-floating tensors the output takes.

    Default: the latest in the series (highest step, else the last given)."""
    if base is None:
        return series_order(sources)[-1]
    if isinstance(base, int) and not isinstance(base, bool):
        if not -len(sources) <= base < len(sources):
            raise MergeError(f"base={base}: there are {len(sources)} sources")
        return sources[base]
    for s in sources:
        if s.uri == base:
            return s
    raise MergeError(f"base={base!r} is not one of the sources")


@dataclass(frozen=True)
class TensorPlan:
    """What the output holds for one key and how it is made."""

    key: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    merged: bool  # floating: weighted sum of every source; else copied from the base
    acc_dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.out_dtype.itemsize


def _selected(key: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    if include and not any(fnmatch.fnmatchcase(key, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(key, p) for p in exclude))


def plan_tensors(
    sources: Sequence[MergeSource],
    base: MergeSource,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, TensorPlan], dict[str, Any]]:
    """Check that the sources agree and decide each output tensor; also the base's values.

    Every selected tensor must be in every source with one shape, and be floating
    in all of them or in none. Raises :class:`SourceMismatchError` listing each problem.
    """
    problems: list[str] = []
    keys = sorted({k for s in sources for k in s.reader.manifest.tensors if _selected(k, include, exclude)})
    if not keys:
        raise MergeError("no tensor is selected" + (f" by include={include} exclude={exclude}" if include else ""))
    plans: dict[str, TensorPlan] = {}
    for key in keys:
        recs = []
        for s in sources:
            rec = s.reader.manifest.tensors.get(key)
            if rec is None:
                where = "holds a JSON value there" if key in s.reader.manifest.values else "does not have it"
                problems.append(f"{key}: {s.uri} {where}")
            else:
                recs.append((s, rec))
        if len(recs) != len(sources):
            continue
        shapes = {tuple(r.shape) for _, r in recs}
        if len(shapes) > 1:
            detail = ", ".join(f"{list(r.shape)} in {s.uri}" for s, r in recs)
            problems.append(f"{key}: shapes differ: {detail}")
            continue
        floating = {r.dtype.is_floating_point for _, r in recs}
        if len(floating) > 1:
            detail = ", ".join(f"{r.dtype} in {s.uri}" for s, r in recs)
            problems.append(f"{key}: floating in some sources, not in others: {detail}")
            continue
        base_rec = base.reader.manifest.tensors[key]
        merged = base_rec.dtype.is_floating_point
        wide = any(r.dtype == torch.float64 for _, r in recs)
        out_dtype = (dtype or base_rec.dtype) if merged else base_rec.dtype
        acc = torch.float64 if wide or out_dtype == torch.float64 else torch.float32
        plans[key] = TensorPlan(key, tuple(base_rec.shape), out_dtype, merged, acc if merged else base_rec.dtype)
    if problems:
        raise SourceMismatchError(problems)
    values = {k: v for k, v in base.reader.values.items() if _selected(k, include, exclude)}
    return plans, values
