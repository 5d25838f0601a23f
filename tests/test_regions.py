"""Property tests of the pure region algebra and of load planning.

Every property is checked against an independent model: numpy index arrays of
small shapes stand in for "the elements a region denotes", so a bug in the
algebra shows up as a set or order mismatch rather than being restated.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt.format import Chunk
from ckpt.readplan import Need, ReadSettings, intersect_chunks, plan_reads
from ckpt.regions import (
    Box,
    cut_all_runs,
    cut_runs,
    flat_range_to_boxes,
    read_spans,
    row_major_strides,
    span_view,
    split_into_chunks,
)

# Local to this module (a loaded profile would change every other test file's settings);
# derandomized so CI runs are reproducible.
PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


# ---------------------------------------------------------------- strategies

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
nonempty_shapes = st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple)


@st.composite
def box_in(draw, shape: tuple[int, ...], nonempty: bool = False) -> Box:
    """A box inside ``shape`` (possibly empty unless ``nonempty``)."""
    offsets, sizes = [], []
    for n in shape:
        lo = draw(st.integers(0, n - 1 if nonempty else n))
        offsets.append(lo)
        sizes.append(draw(st.integers(1 if nonempty else 0, n - lo)))
    return Box(tuple(offsets), tuple(sizes))


@st.composite
def shape_and_box(draw, nonempty: bool = False) -> tuple[tuple[int, ...], Box]:
    shape = draw(nonempty_shapes if nonempty else shapes)
    return shape, draw(box_in(shape, nonempty))


@st.composite
def chunk_and_want(draw) -> tuple[Box, Box]:
    """A non-empty stored chunk somewhere in a global tensor and a non-empty box inside it."""
    shape = draw(nonempty_shapes)
    chunk = draw(box_in(shape, nonempty=True))
    rel = draw(box_in(chunk.sizes, nonempty=True))
    want = Box(tuple(o + r for o, r in zip(chunk.offsets, rel.offsets)), rel.sizes)
    return chunk, want


def ids(shape: tuple[int, ...], box: Box) -> np.ndarray:
    """Flat (row-major) indices of the elements of ``box`` in a tensor of ``shape``, in row-major order."""
    return np.arange(math.prod(shape)).reshape(shape)[box.slices()].ravel()


# ---------------------------------------------------------------- Box basics


def test_box_rejects_bad_input():
    with pytest.raises(ValueError, match="rank mismatch"):
        Box((0,), (1, 2))
    with pytest.raises(ValueError, match="negative"):
        Box((-1,), (2,))
    with pytest.raises(ValueError, match="negative"):
        Box((0,), (-2,))


@PROPS
@given(shape_and_box())
def test_slices_relative_to_and_contains_agree_with_numpy(sb):
    shape, box = sb
    assert box.fits_in(shape)
    assert box.numel == ids(shape, box).size
    assert Box.full(shape).contains(box)
    rel = box.relative_to(Box.full(shape))
    assert rel == box  # the full box starts at the origin
    assert box.is_empty() == (box.numel == 0)


# ---------------------------------------------------------------- flat ranges


@st.composite
def flat_range(draw) -> tuple[tuple[int, ...], int, int]:
    shape = draw(shapes)
    total = math.prod(shape)
    start = draw(st.integers(0, total))
    stop = draw(st.integers(start, total))
    return shape, start, stop


@PROPS
@given(flat_range())
def test_flat_range_to_boxes_tiles_the_range_in_flat_order(case):
    shape, start, stop = case
    boxes = flat_range_to_boxes(start, stop, shape)
    pieces = []
    for b in boxes:
        assert b.fits_in(shape)
        assert not b.is_empty()
        got = ids(shape, b)
        # each box is one contiguous run of the row-major flattening
        np.testing.assert_array_equal(got, np.arange(got[0], got[0] + got.size))
        pieces.append(got)
    # in flat order, disjoint, and together exactly [start, stop)
    joined = np.concatenate(pieces) if pieces else np.arange(0)
    np.testing.assert_array_equal(joined, np.arange(start, stop))
    assert len(boxes) <= max(1, 2 * len(shape) - 1)


@PROPS
@given(shapes, st.integers(-3, 3), st.integers(0, 4))
def test_flat_range_outside_the_tensor_is_refused(shape, start, extra):
    total = math.prod(shape)
    bad = [(start, total + 1 + extra)] + ([(start, start - 1)] if start >= 1 else []) + [(-1 - extra, 0)]
    for lo, hi in bad:
        with pytest.raises(ValueError, match="outside a tensor"):
            flat_range_to_boxes(lo, hi, shape)


# ---------------------------------------------------------------- chunking


@PROPS
@given(shape_and_box(), st.sampled_from([1, 2, 4, 8, 16]), st.integers(1, 300))
def test_split_into_chunks_tiles_the_box_in_row_major_slabs(sb, item, max_bytes):
    shape, box = sb
    chunks = split_into_chunks(box, item, max_bytes)
    if box.is_empty():
        assert chunks == [box]
        return
    # Positions in the box's own row-major order: the chunks must be consecutive runs of it.
    local = np.arange(box.numel).reshape(box.sizes)
    runs = []
    for c in chunks:
        assert box.contains(c) and c.ndim == box.ndim
        assert not c.is_empty()
        assert c.numel * item <= max_bytes or c.numel == 1, (c, item, max_bytes)
        run = local[c.relative_to(box).slices()].ravel()
        np.testing.assert_array_equal(run, np.arange(run[0], run[0] + run.size))
        runs.append(run)
    np.testing.assert_array_equal(np.concatenate(runs), np.arange(box.numel))
    if box.numel * item <= max_bytes:
        assert chunks == [box]


def test_split_into_chunks_single_element_larger_than_limit():
    # An 8-byte element under a 4-byte limit cannot be split: one element per chunk.
    chunks = split_into_chunks(Box((2, 0), (2, 3)), 8, 4)
    assert chunks == [Box((2 + i, j), (1, 1)) for i in range(2) for j in range(3)]
    assert split_into_chunks(Box((), ()), 8, 1) == [Box((), ())]


# ---------------------------------------------------------------- intersection


@st.composite
def two_boxes(draw) -> tuple[tuple[int, ...], Box, Box]:
    shape = draw(shapes)
    return shape, draw(box_in(shape)), draw(box_in(shape))


@PROPS
@given(two_boxes())
def test_intersect_is_element_set_intersection(case):
    shape, a, b = case
    ab, ba = a.intersect(b), b.intersect(a)
    assert ab == ba
    expected = np.intersect1d(ids(shape, a), ids(shape, b))
    if ab is None:
        assert expected.size == 0
        return
    assert not ab.is_empty()
    assert a.contains(ab) and b.contains(ab)
    np.testing.assert_array_equal(np.sort(ids(shape, ab)), expected)


def test_intersect_of_zero_dim_boxes():
    assert Box((), ()).intersect(Box((), ())) == Box((), ())


# ---------------------------------------------------------------- read spans


def _check_spans(chunk: Box, want: Box, max_gap: int) -> list:
    spans = read_spans(chunk, want, max_gap)
    stored = torch.arange(chunk.numel, dtype=torch.int64)  # the chunk's row-major buffer
    as_array = stored.reshape(chunk.sizes)
    wanted = set(np.arange(chunk.numel).reshape(chunk.sizes)[want.relative_to(chunk).slices()].ravel().tolist())
    covered: list[int] = []
    last_stop = 0
    for s in spans:
        assert 0 <= s.start < s.stop <= chunk.numel
        assert s.start >= last_stop, "spans must be ordered and disjoint"
        last_stop = s.stop
        assert want.contains(s.box) and not s.box.is_empty()
        # the span's view, over a buffer holding only the span's elements, is chunk[box]
        sizes, strides, offset = span_view(chunk, s)
        buf = stored[s.start : s.stop].clone()
        assert offset >= 0
        assert offset + sum((n - 1) * st for n, st in zip(sizes, strides)) < buf.numel()
        view = torch.as_strided(buf, sizes, strides, offset)
        assert torch.equal(view, as_array[s.box.relative_to(chunk).slices()])
        covered.extend(view.reshape(-1).tolist())
        # a span starts and ends on wanted elements; holes inside it are at most max_gap long
        assert s.start in wanted and s.stop - 1 in wanted
        hole = 0
        for i in range(s.start, s.stop):
            hole = 0 if i in wanted else hole + 1
            assert hole <= max_gap
    assert sorted(covered) == sorted(wanted), "spans must cover each wanted element exactly once"
    return spans


@PROPS
@given(chunk_and_want(), st.integers(0, 40))
def test_read_spans_cover_want_and_views_match(cw, max_gap):
    chunk, want = cw
    _check_spans(chunk, want, max_gap)


@PROPS
@given(chunk_and_want())
def test_read_spans_without_gap_read_only_wanted_elements(cw):
    chunk, want = cw
    for s in _check_spans(chunk, want, 0):
        assert s.stop - s.start == s.box.numel


@PROPS
@given(chunk_and_want())
def test_read_spans_with_a_huge_gap_make_one_span(cw):
    chunk, want = cw
    spans = _check_spans(chunk, want, chunk.numel)
    assert len(spans) == 1 and spans[0].box == want


def test_read_spans_refuses_a_box_outside_the_chunk_and_skips_empty():
    with pytest.raises(ValueError, match="not inside chunk"):
        read_spans(Box((2, 0), (2, 2)), Box((1, 0), (2, 2)), 0)
    assert read_spans(Box((0, 0), (2, 2)), Box((1, 0), (0, 2)), 0) == []


def test_row_major_strides():
    assert row_major_strides((3, 4, 5)) == (20, 5, 1)
    assert row_major_strides(()) == ()


# ---------------------------------------------------------------- load planning


@st.composite
def planning_case(draw):
    """Chunks of one tensor laid out in one or two objects, needs of a few target boxes."""
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple))
    item = draw(st.sampled_from([1, 2, 4, 8]))
    chunk_bytes = draw(st.integers(1, math.prod(shape) * item))
    block = draw(st.integers(1, 64))
    boxes = split_into_chunks(Box.full(shape), item, chunk_bytes)
    n_objects = draw(st.integers(1, 2))
    ends = {f"obj{i}": draw(st.integers(0, 16)) for i in range(n_objects)}  # header sizes
    chunks = []
    for b in boxes:
        obj = f"obj{draw(st.integers(0, n_objects - 1))}"
        length = b.numel * item
        chunks.append(Chunk(b, obj, ends[obj], length, ("0",) * max(1, -(-length // block))))
        ends[obj] += length
    targets = draw(st.lists(box_in(shape, nonempty=True), min_size=1, max_size=3))
    needs: list[Need] = []
    gap_bytes = draw(st.integers(0, 64))
    for i, t in enumerate(targets):
        got, covered = intersect_chunks("t", i, t, chunks, item, gap_bytes)
        assert covered == t.numel
        needs.extend(got)
    s = ReadSettings(block, draw(st.booleans()), gap_bytes, draw(st.integers(1, 400)))
    direct_seed = draw(st.integers(0, 3))
    return needs, s, (lambda n: (n.piece + direct_seed) % 3 != 0)


@pytest.mark.slow
@settings(PROPS, max_examples=150)
@given(planning_case())
def test_plan_reads_invariants(case):
    needs, s, direct_ok = case
    reads = plan_reads(needs, s, direct_ok)
    B = s.block_bytes
    home: dict[int, list] = {}  # id(need) -> [(read, segment)]
    by_object: dict[str, list] = {}
    for r in reads:
        assert r.segments
        by_object.setdefault(r.object, []).append(r)
        data_segs = [g for g in r.segments if g.direct is not None or g.needs]
        assert data_segs, "a read must serve something"
        # one request: segments contiguous and ordered
        for a, b in zip(r.segments, r.segments[1:]):
            assert a.stop == b.start
        for g in r.segments:
            assert g.start < g.stop
            if g.direct is None and not g.needs:
                assert g.stop - g.start <= s.max_gap_bytes and not g.blocks  # a gap read through
        assert r.stop - r.start <= s.max_read_bytes or len(data_segs) == 1
        for g in data_segs:
            if g.direct is not None:
                d = g.direct
                assert not g.needs and direct_ok(d)
                assert (g.start, g.stop) == (d.chunk.offset, d.chunk.offset + d.chunk.length)
                assert d.chunk.object == r.object
                home.setdefault(id(d), []).append(g)
            for n in g.needs:
                assert n.chunk.object == r.object
                home.setdefault(id(n), []).append(g)
            for (off, b, _), c in g.blocks.items():
                assert off == c.offset and 0 <= b < len(c.checksums)
                # every verified block lies inside the segment's buffer
                lo, hi = c.offset + b * B, min(c.offset + (b + 1) * B, c.offset + c.length)
                assert g.start <= lo and hi <= g.stop
    # reads of one object never overlap and are in offset order
    for rs in by_object.values():
        for a, b in zip(rs, rs[1:]):
            assert a.stop <= b.start
    for n in needs:
        segs = home.get(id(n), [])
        assert len(segs) == 1, f"need {n.span} is served by {len(segs)} segments"
        g = segs[0]
        assert g.start <= n.byte_start and n.byte_stop <= g.stop
        if s.verify:
            first = (n.byte_start - n.chunk.offset) // B
            last = -(-(n.byte_stop - n.chunk.offset) // B)
            for b in range(first, last):
                assert (n.chunk.offset, b, id(n.chunk)) in g.blocks, "a byte copied out must be verified"


@st.composite
def held_runs(draw) -> tuple[tuple[int, int], ...]:
    """Runs a local shard may hold along one dim: ascending, disjoint, some adjacent."""
    runs, at = [], draw(st.integers(0, 5))
    for _ in range(draw(st.integers(0, 6))):
        count = draw(st.integers(1, 9))
        runs.append((at, count))
        at += count + draw(st.integers(0, 3))
    return tuple(runs)


@given(held_runs(), st.integers(1, 12), st.sampled_from([0, 1, 2, 3, 8]))
def test_cutting_every_part_at_once_is_cutting_each_part(held, parts, split) -> None:
    """The grid of a rule cuts every part in one pass; each must be exactly DTensor's cut of that part."""
    assert cut_all_runs(held, parts, split) == [cut_runs(held, parts, i, split) for i in range(parts)]
