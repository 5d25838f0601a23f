"""Compare two checkpoints (any formats) tensor by tensor, streaming slab by slab.

Bitwise equality is checked first (identical NaNs are equal); only slabs that
differ are widened to float64 to measure how much: the largest absolute
difference and the relative L2 norm ||a - b|| / ||a||. Memory: one slab of
each side (DCP sources: one tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .interop.source import Source, slabs
from .options import StrEnum


class DiffStatus(StrEnum):
    """How one key compares."""

    IDENTICAL = "identical"  # bitwise equal
    CLOSE = "close"  # not bitwise equal, but within the tolerances
    DIFFERENT = "different"
    ONLY_A = "only_a"
    ONLY_B = "only_b"
    SHAPE = "shape"  # shapes differ: not compared further


@dataclass
class TensorDiff:
    key: str
    status: DiffStatus
    shape_a: list[int] | None = None
    shape_b: list[int] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    numel: int = 0
    n_diff: int = 0  # elements outside the tolerance
    max_abs: float = 0.0
    rel_l2: float = 0.0

    @property
    def differs(self) -> bool:
        return self.status not in (DiffStatus.IDENTICAL, DiffStatus.CLOSE)


@dataclass
class ValueDiff:
    key: str
    status: DiffStatus  # ONLY_A, ONLY_B or DIFFERENT
    a: Any = None
    b: Any = None


@dataclass
class DiffReport:
    a: str
    b: str
    tensors: list[TensorDiff] = field(default_factory=list)
    values: list[ValueDiff] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.values and not any(t.differs for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "equal": self.equal,
            "tensors": [_finite(asdict(t)) for t in self.tensors],
            "values": [asdict(v) for v in self.values],
        }


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no inf/nan: write them as strings."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


class _Stats:
    def __init__(self) -> None:
        self.n_diff = 0
        self.max_abs = 0.0
        self.sq_diff = 0.0
        self.sq_a = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> None:
        wide = torch.complex128 if (a.is_complex() or b.is_complex()) else torch.float64
        x, y = a.reshape(-1).to(wide), b.reshape(-1).to(wide)
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        d = torch.where(same, torch.zeros((), dtype=torch.float64), (x - y).abs())
        d = torch.nan_to_num(d, nan=math.inf)  # a NaN against a number is infinitely far
        tol = atol + rtol * torch.nan_to_num(y.abs(), nan=0.0)
        self.n_diff += int((~same & ((d > tol) | ~torch.isfinite(d))).sum())
        if d.numel():
            self.max_abs = max(self.max_abs, float(d.max()))
        finite = torch.isfinite(d)
        self.sq_diff += float((d[finite] ** 2).sum()) + (math.inf if not bool(finite.all()) else 0.0)
        xa = x.abs()
        self.sq_a += float((xa[torch.isfinite(xa)] ** 2).sum())

    @property
    def rel_l2(self) -> float:
        if self.sq_diff == 0.0:
            return 0.0
        return math.sqrt(self.sq_diff) / math.sqrt(self.sq_a) if self.sq_a > 0 else math.inf


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def compare_tensor(
    a: Source,
    b: Source,
    key: str,
    atol: float = 0.0,
    rtol: float = 0.0,
    slab_bytes: int = 64 << 20,
    progress: Callable[[int], None] | None = None,
) -> TensorDiff:
    ia, ib = a.tensors()[key], b.tensors()[key]
    out = TensorDiff(
        key, DiffStatus.IDENTICAL, list(ia.shape), list(ib.shape), str(ia.dtype).removeprefix("torch."),
        str(ib.dtype).removeprefix("torch."), math.prod(ia.shape),
    )  # fmt: skip
    if ia.shape != ib.shape:
        out.status = DiffStatus.SHAPE
        return out
    stats: _Stats | None = None
    for box in slabs(ia, slab_bytes):
        xa, xb = a.read(key, box), b.read(key, box)
        if not _bitwise_equal(xa, xb):
            stats = stats or _Stats()
            stats.add(xa, xb, atol, rtol)
        if progress:
            progress(box.numel * ia.dtype.itemsize)
    if stats is None:
        return out
    out.n_diff, out.max_abs, out.rel_l2 = stats.n_diff, stats.max_abs, stats.rel_l2
    out.status = DiffStatus.DIFFERENT if (out.n_diff or ia.dtype != ib.dtype) else DiffStatus.CLOSE
    return out


def diff(
    a: Source,
    b: Source,
    atol: float = 0.0,
    rtol: float = 0.0,
    slab_bytes: int = 64 << 20,
    progress: Callable[[int], None] | None = None,
) -> DiffReport:
    """Every tensor and value of ``a`` against ``b``. A tensor is *close* when it is
    not bitwise identical but every element satisfies |a - b| <= atol + rtol * |b|
    (with the default zero tolerances, any change makes it *different*)."""
    ta, tb = a.tensors(), b.tensors()
    report = DiffReport(a.uri, b.uri)
    for key in sorted(set(ta) | set(tb)):
        if key not in tb:
            report.tensors.append(TensorDiff(key, DiffStatus.ONLY_A, list(ta[key].shape), None, str(ta[key].dtype)[6:]))
            if progress:
                progress(ta[key].nbytes)
        elif key not in ta:
            only_b = TensorDiff(key, DiffStatus.ONLY_B, None, list(tb[key].shape), None, str(tb[key].dtype)[6:])
            report.tensors.append(only_b)
        else:
            report.tensors.append(compare_tensor(a, b, key, atol, rtol, slab_bytes, progress))
    va, vb = a.values(), b.values()
    for key in sorted(set(va) | set(vb)):
        if key not in vb:
            report.values.append(ValueDiff(key, DiffStatus.ONLY_A, a=va[key]))
        elif key not in va:
            report.values.append(ValueDiff(key, DiffStatus.ONLY_B, b=vb[key]))
        elif va[key] != vb[key]:
            report.values.append(ValueDiff(key, DiffStatus.DIFFERENT, va[key], vb[key]))
    return report
