"""Region algebra: where a local shard sits inside its global tensor.

Everything here is pure: boxes, flat ranges and their intersections, chunking and
the byte spans a reader must fetch. No torch, no I/O, so it is tested with
hypothesis and without processes.

A *box* is an n-d sub-rectangle of the global tensor (offsets, sizes), stored
row-major. A *flat range* [start, stop) of the row-major flattening (ZeRO,
distributed-optimizer buffers) decomposes into at most 2*ndim - 1 boxes that are
contiguous in flat order, so flat ranges reduce to boxes and only boxes need an
intersection rule.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True, order=True)
class Box:
    """An n-d box of a global tensor: ``global[o0:o0+s0, o1:o1+s1, ...]``."""

    offsets: Shape
    sizes: Shape

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.sizes):
            raise ValueError(f"box rank mismatch: offsets {self.offsets} vs sizes {self.sizes}")
        if any(o < 0 for o in self.offsets) or any(s < 0 for s in self.sizes):
            raise ValueError(f"negative offset or size in box {self}")

    @classmethod
    def full(cls, shape: Sequence[int]) -> Box:
        return cls((0,) * len(shape), tuple(shape))

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def ends(self) -> Shape:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    def is_empty(self) -> bool:
        return self.numel == 0

    def fits_in(self, shape: Sequence[int]) -> bool:
        return len(shape) == self.ndim and all(e <= n for e, n in zip(self.ends, shape))

    def contains(self, other: Box) -> bool:
        return all(
            o <= p and p + q <= o + s for o, s, p, q in zip(self.offsets, self.sizes, other.offsets, other.sizes)
        )

    def intersect(self, other: Box) -> Box | None:
        """The common box, or None when the two share no element."""
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a, b) for a, b in zip(self.ends, other.ends))
        if any(h <= low for low, h in zip(lo, hi)):
            return None
        return Box(lo, tuple(h - low for low, h in zip(lo, hi)))

    def relative_to(self, outer: Box) -> Box:
        """This box in the coordinates of ``outer`` (which must contain it)."""
        return Box(tuple(a - b for a, b in zip(self.offsets, outer.offsets)), self.sizes)

    def slices(self) -> tuple[slice, ...]:
        """Index that selects this box from a tensor holding the whole space."""
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))

    def to_json(self) -> dict:
        return {"offsets": list(self.offsets), "sizes": list(self.sizes)}


def row_major_strides(sizes: Sequence[int]) -> Shape:
    strides = [1] * len(sizes)
    for d in range(len(sizes) - 2, -1, -1):
        strides[d] = strides[d + 1] * max(sizes[d + 1], 1)
    return tuple(strides)


def flat_range_to_boxes(start: int, stop: int, shape: Sequence[int]) -> list[Box]:
    """Split the flat range [start, stop) of a row-major tensor into boxes.

    The boxes are returned in flat order and are each contiguous in the
    flattening, so a 1-D buffer holding the range is their concatenation.
    """
    total = math.prod(shape)
    if not 0 <= start <= stop <= total:
        raise ValueError(f"flat range [{start}, {stop}) outside a tensor of {total} elements")
    if start == stop:
        return []
    if len(shape) == 0:
        return [Box((), ())]
    return list(_flat_boxes(start, stop, tuple(shape)))


def _flat_boxes(start: int, stop: int, shape: Shape) -> Iterator[Box]:
    inner = math.prod(shape[1:])
    if len(shape) == 1:
        yield Box((start,), (stop - start,))
        return
    first_row, first_col = divmod(start, inner)
    last_row, last_col = divmod(stop, inner)
    if first_row == last_row:  # within one row of dim 0: recurse into it
        for b in _flat_boxes(first_col, last_col, shape[1:]):
            yield Box((first_row, *b.offsets), (1, *b.sizes))
        return
    if first_col:
        for b in _flat_boxes(first_col, inner, shape[1:]):
            yield Box((first_row, *b.offsets), (1, *b.sizes))
        first_row += 1
    if last_row > first_row:
        yield Box((first_row,) + (0,) * (len(shape) - 1), (last_row - first_row, *shape[1:]))
    if last_col:
        for b in _flat_boxes(0, last_col, shape[1:]):
            yield Box((last_row, *b.offsets), (1, *b.sizes))


def tiling_defect(shape: Sequence[int], boxes: Sequence[Box]) -> Shape | None:
    """None if ``boxes`` cover every element of ``shape`` exactly once, else a point near a defect
    (an element covered twice or never; a corner of some box or of the shape).

    Exact at any number of boxes, in O(n * 2**ndim): the mixed finite difference of a box's
    indicator function is +-1 at its 2**ndim corners (sign: -1 per coordinate taken from the
    end) and 0 elsewhere, and the difference is linear and invertible (its inverse is the prefix
    sum). So the boxes' coverage counts equal the shape's indicator, i.e. each element is covered
    exactly once, if and only if their signed corners add up to the shape's. Empty boxes cover
    nothing and contribute nothing.
    """
    live = [b for b in boxes if not b.is_empty()]
    if math.prod(shape) and all(b.offsets[1:] == (0,) * (b.ndim - 1) and b.sizes[1:] == tuple(shape[1:]) for b in live):
        # the common case, slabs of whole rows: they must follow each other from row 0 to the end
        at = 0
        for b in sorted(live, key=lambda b: b.offsets[:1]):
            if b.ndim and b.offsets[0] != at:
                return (min(at, b.offsets[0]), *(0,) * (b.ndim - 1))
            at += b.sizes[0] if b.ndim else 1
        if at == (shape[0] if shape else 1):
            return None
    signs = [(-1) ** sum(pick) for pick in itertools.product((0, 1), repeat=len(shape))]
    total: dict[Shape, int] = {}
    for b, weight in itertools.chain(((Box.full(shape), -1),), ((b, 1) for b in live)):
        for corner, sign in zip(itertools.product(*zip(b.offsets, b.ends)), signs):
            total[corner] = total.get(corner, 0) + weight * sign
    bad = [p for p, n in total.items() if n]
    return min(bad) if bad else None

Runs = tuple[tuple[int, int], ...]


def chunk_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of part ``index`` when ``size`` items are cut like ``torch.chunk``:
    parts of ceil(size / parts), the last short, any past the end empty."""
    step = -(-size // parts)
    return min(index * step, size), min((index + 1) * step, size)


def select_runs(runs: Runs, lo: int, hi: int) -> Runs:
    """The items at positions [lo, hi) of ``runs``.

    ``runs`` lists, in local order, the global indices one dimension of a local
    shard holds, as (first global index, count) pairs; the result is the same
    for a sub-range of those positions, with globally adjacent runs merged.
    """
    out: list[tuple[int, int]] = []
    at = 0
    for start, count in runs:
        a, b = max(lo, at), min(hi, at + count)
        if a < b:
            g = start + a - at
            if out and out[-1][0] + out[-1][1] == g:
                out[-1] = (out[-1][0], out[-1][1] + b - a)
            else:
                out.append((g, b - a))
        at += count
    return tuple(out)


def concat_runs(parts: Sequence[Runs]) -> Runs:
    """Runs of the concatenation of ``parts``, globally adjacent runs merged."""
    flat = tuple(r for part in parts for r in part)
    return select_runs(flat, 0, sum(c for _, c in flat))


def cut_runs(held: Runs, parts: int, index: int, split: int = 0) -> Runs:
    """What part ``index`` of ``parts`` keeps of the runs ``held`` along one tensor dim, as DTensor
    cuts it: ``Shard`` (``split`` 0) takes one ``torch.chunk`` part; ``_StridedShard`` with
    ``split_factor`` ``split`` cuts the held items into ``split`` parts and takes that part of each."""
    if not split:
        return select_runs(held, *chunk_bounds(runs_length(held), parts, index))
    cut = []
    for j in range(split):
        lo, hi = chunk_bounds(runs_length(held), split, j)
        a, b = chunk_bounds(hi - lo, parts, index)
        cut.append(select_runs(held, lo + a, lo + b))
    return concat_runs(cut)


def cut_all_runs(held: Runs, parts: int, split: int = 0) -> list[Runs]:
    """``cut_runs(held, parts, i, split)`` for every ``i`` in ``range(parts)``, in one pass over ``held``:
    the parts' position ranges, taken in position order, only move forward through the runs (a grid
    of thousands of ranks cuts each dim once, not once per rank)."""
    n = runs_length(held)
    if not split:
        ranges = [(*chunk_bounds(n, parts, i), i) for i in range(parts)]
    else:
        ranges = []
        for j in range(split):
            lo, hi = chunk_bounds(n, split, j)
            ranges += [(lo + a, lo + b, i) for i in range(parts) for a, b in (chunk_bounds(hi - lo, parts, i),)]
    out: list[list[tuple[int, int]]] = [[] for _ in range(parts)]
    k = at = 0  # the run holding position ``at`` onwards, and its first position
    for lo, hi, i in ranges:
        while lo < hi:
            while at + held[k][1] <= lo:
                at += held[k][1]
                k += 1
            start, count = held[k]
            stop = min(hi, at + count)
            g, part = start + lo - at, out[i]
            if part and part[-1][0] + part[-1][1] == g:
                part[-1] = (part[-1][0], part[-1][1] + stop - lo)
            else:
                part.append((g, stop - lo))
            lo = stop
    return [tuple(p) for p in out]


def runs_length(runs: Runs) -> int:
    return sum(c for _, c in runs)


def split_into_chunks(box: Box, itemsize: int, max_bytes: int) -> list[Box]:
    """Cut a box into row-major slabs of at most ``max_bytes`` (at least one element).

    The split is along the outermost dimension whose inner block fits, so each
    chunk is as large as allowed and contiguous in the box's row-major order.
    """
    if box.is_empty() or box.numel * itemsize <= max_bytes or box.ndim == 0:
        return [box]
    inner = box.numel
    for d in range(box.ndim):
        inner //= max(box.sizes[d], 1)
        if inner * itemsize <= max_bytes:
            step = max(1, max_bytes // (inner * itemsize))
            break
    else:  # one element is larger than max_bytes: it cannot be cut, one per chunk
        d, step = box.ndim - 1, 1
    chunks = []
    for outer in _indices(box.sizes[:d]):
        for lo in range(0, box.sizes[d], step):
            n = min(step, box.sizes[d] - lo)
            offsets = (
                *(o + i for o, i in zip(box.offsets, outer)),
                box.offsets[d] + lo,
                *box.offsets[d + 1 :],
            )
            chunks.append(Box(offsets, (*(1,) * d, n, *box.sizes[d + 1 :])))
    return chunks


def _indices(sizes: Sequence[int]) -> Iterator[Shape]:
    if not sizes:
        yield ()
        return
    for i in range(sizes[0]):
        for rest in _indices(sizes[1:]):
            yield (i, *rest)


@dataclass(frozen=True)
class Span:
    """A contiguous element range [start, stop) of a stored chunk and the part
    of the wanted box whose elements all lie inside it."""

    start: int
    stop: int
    box: Box


def read_spans(chunk: Box, want: Box, max_gap: int) -> list[Span]:
    """Element spans of ``chunk`` (stored row-major) that cover ``want``.

    ``want`` must lie inside ``chunk``. Runs separated by at most ``max_gap``
    elements are merged into one span: reading a small gap is cheaper than
    another request. Each span covers a slab of ``want`` along one dimension.
    """
    if not chunk.contains(want):
        raise ValueError(f"{want} is not inside chunk {chunk}")
    if want.is_empty():
        return []
    rel = want.relative_to(chunk)
    strides = row_major_strides(chunk.sizes)
    # Find the outermost dim k such that the whole of want[k:] fits one span.
    k = chunk.ndim
    for d in range(chunk.ndim - 1, -1, -1):
        if rel.sizes[d] == 1:
            k = d
            continue
        inner_first = sum(o * s for o, s in zip(rel.offsets[d + 1 :], strides[d + 1 :]))
        inner_last = sum((o + n - 1) * s for o, n, s in zip(rel.offsets[d + 1 :], rel.sizes[d + 1 :], strides[d + 1 :]))
        gap = strides[d] - (inner_last - inner_first + 1)
        if gap > max_gap:
            break
        k = d
    spans = []
    for outer in _indices(rel.sizes[:k]):
        lo = tuple(o + i for o, i in zip(rel.offsets[:k], outer)) + rel.offsets[k:]
        hi = tuple(o + i for o, i in zip(rel.offsets[:k], outer)) + tuple(
            o + n - 1 for o, n in zip(rel.offsets[k:], rel.sizes[k:])
        )
        first = sum(i * s for i, s in zip(lo, strides))
        last = sum(i * s for i, s in zip(hi, strides))
        sub = Box(
            tuple(w + i for w, i in zip(want.offsets[:k], outer)) + want.offsets[k:],
            (1,) * k + want.sizes[k:],
        )
        spans.append(Span(first, last + 1, sub))
    return spans


def span_view(chunk: Box, span: Span) -> tuple[Shape, Shape, int]:
    """(sizes, strides, offset) that view ``span.box`` inside a buffer holding
    the chunk's elements [span.start, span.stop)."""
    strides = row_major_strides(chunk.sizes)
    rel = span.box.relative_to(chunk)
    first = sum(o * s for o, s in zip(rel.offsets, strides))
    return span.box.sizes, strides, first - span.start
