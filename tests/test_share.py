"""ckpt.share's pure half: the parts a replica group cuts its targets into, who reads which in what round,
and when a group shares at all. No processes: the planned parts go through the real load planner to
count the bytes each member would read."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.format import Chunk
from ckpt.readplan import ReadSettings, intersect_chunks, plan_reads
from ckpt.regions import Box, split_into_chunks
from ckpt.share import Part, Unit, cut_parts, decide, plan_rounds, rank_mode

MIB = 1 << 20


def _chunks(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> list[Chunk]:
    out, at = [], 0
    for box in split_into_chunks(Box.full(shape), itemsize, chunk_bytes):
        n = box.numel * itemsize
        out.append(Chunk(box, "obj", at, n, ()))
        at += n
    return out


def _elements(box: Box) -> set[tuple[int, ...]]:
    import itertools

    return set(itertools.product(*(range(o, o + s) for o, s in zip(box.offsets, box.sizes))))


def _blocks_read(parts: list[Part], chunks: list[Chunk], itemsize: int, block: int, gap: int = 0) -> tuple[int, set]:
    """Bytes a member reading ``parts`` fetches (reading through gaps up to ``gap``, as loads do), and the
    (chunk offset, block) of each block it verifies."""
    needs = []
    for p in parts:
        got, _ = intersect_chunks(p.key, 0, p.box, chunks, itemsize, 1 << 20)
        needs.extend(got)
    reads = plan_reads(needs, ReadSettings(block, True, gap, 64 * MIB), lambda n: True)
    nbytes = sum(s.stop - s.start for r in reads for s in r.segments)
    blocks = {(c.offset, b) for r in reads for s in r.segments for (_, b, _), c in s.blocks.items()}
    return nbytes, blocks


def test_parts_of_whole_chunks_are_the_chunks():
    chunks = _chunks((64, 32), 4, 2048)  # 16 rows a chunk
    parts = cut_parts("w", 0, Box.full((64, 32)), 4, chunks, 1024, 1 << 30)
    assert [p.box for p in parts] == [c.box for c in chunks]
    assert sum(p.nbytes for p in parts) == 64 * 32 * 4


def test_large_chunks_are_cut_on_block_edges_so_no_block_is_read_twice():
    # one 4 MiB chunk of 1 KiB rows, 64 KiB blocks, parts of at most 300 KiB: slabs of 256 rows (4 blocks)
    shape, itemsize, block = (4096, 256), 4, 64 << 10
    chunks = _chunks(shape, itemsize, 64 * MIB)
    parts = cut_parts("w", 0, Box.full(shape), itemsize, chunks, block, 300 << 10)
    assert len(parts) == 16 and all(p.nbytes == 256 << 10 for p in parts)
    rounds = plan_rounds(parts, 4, 1 << 30)
    seen: set = set()
    total = 0
    for m in range(4):
        mine = [p for rnd in rounds for p in rnd[m]]
        nbytes, blocks = _blocks_read(mine, chunks, itemsize, block)
        assert not blocks & seen, "two members verify the same block"
        seen |= blocks
        total += nbytes
    assert total == math.prod(shape) * itemsize  # the group reads the tensor exactly once


def test_cuts_find_the_first_block_edge_of_a_part_that_starts_mid_chunk():
    # the target piece starts at row 100 of a chunk: its first cut is at row 128 (a 64 KiB edge of 512 B rows)
    shape, itemsize, block = (1024, 128), 4, 64 << 10
    chunks = _chunks(shape, itemsize, 64 * MIB)
    piece = Box((100, 0), (900, 128))
    parts = cut_parts("w", 0, piece, itemsize, chunks, block, 100 << 10)
    starts = [p.box.offsets[0] for p in parts]
    assert starts[:3] == [100, 128, 256]
    assert all((s * 128 * itemsize) % block == 0 for s in starts[1:])


def test_parts_whose_row_edges_meet_no_block_edge_stay_whole():
    # 280 B rows (70 floats): a row edge meets a 4 KiB block edge every 512 rows, beyond a 117-row chunk;
    # cutting it would make two members read the block across the cut
    chunks = _chunks((300, 70), 4, 117 * 280)
    parts = cut_parts("w", 0, Box.full((300, 70)), 4, chunks, 4096, 6000)
    assert [p.box for p in parts] == [c.box for c in chunks]
    # a column block is not contiguous in its chunk: not cut either
    col = cut_parts("w", 0, Box((0, 0), (300, 35)), 4, chunks, 4096, 6000)
    assert [p.box.sizes for p in col] == [(117, 35), (117, 35), (66, 35)]


@settings(max_examples=150, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    chunk_elems=st.integers(1, 40),
    max_elems=st.integers(1, 50),
    data=st.data(),
)
def test_parts_tile_the_target_exactly(shape, chunk_elems, max_elems, data):
    full = Box.full(shape)
    lo = tuple(data.draw(st.integers(0, n - 1)) for n in shape)
    hi = tuple(data.draw(st.integers(a + 1, n)) for a, n in zip(lo, shape))
    piece = Box(lo, tuple(b - a for a, b in zip(lo, hi)))
    chunks = _chunks(shape, 2, chunk_elems * 2)
    parts = cut_parts("k", 3, piece, 2, chunks, 64, max_elems * 2)
    covered: list = []
    for p in parts:
        assert p.key == "k" and p.piece == 3 and p.nbytes == p.box.numel * 2
        assert piece.contains(p.box) and any(c.box.contains(p.box) for c in chunks)
        covered.extend(_elements(p.box))
    assert len(covered) == len(set(covered)) and set(covered) == _elements(piece)
    assert full.contains(piece)


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 1000), min_size=0, max_size=60),
    members=st.integers(1, 6),
    round_bytes=st.integers(1, 5000),
)
def test_rounds_give_each_member_one_run_of_storage(sizes, members, round_bytes):
    at, parts = 0, []
    for i, n in enumerate(sizes):
        parts.append(Part(f"k{i}", 0, Box((i,), (1,)), n, ("obj", at)))
        at += n
    shuffled = parts[1::2] + parts[0::2]  # the order parts are given in does not matter
    rounds = plan_rounds(shuffled, members, round_bytes)
    assert rounds == plan_rounds(shuffled, members, round_bytes)  # every member computes the same plan
    assert all(len(rnd) == members for rnd in rounds)
    mine = [[p for rnd in rounds for p in rnd[m]] for m in range(members)]
    assert [p for run in mine for p in run] == parts  # each part once; member m's run follows m-1's
    if parts:
        loads = [sum(p.nbytes for p in run) for run in mine]
        assert max(loads) - sum(sizes) / members <= max(sizes)
    per = max(1, round_bytes // members)
    for rnd in rounds:
        assert any(rnd)
        for ps in rnd:
            assert len(ps) <= 1 or sum(p.nbytes for p in ps) <= per


def test_members_read_disjoint_runs_of_a_tensor_of_many_chunks():
    # 16 chunks of 64 KiB, one object: each of 4 members reads one run of 4 chunks, so a read planner
    # that reads through small gaps finds none to read through
    shape, itemsize = (4096, 64), 4
    chunks = _chunks(shape, itemsize, 64 << 10)
    assert len(chunks) == 16
    parts = cut_parts("w", 0, Box.full(shape), itemsize, chunks, 4096, 1 << 30)
    rounds = plan_rounds(parts, 4, 1 << 30)
    for m in range(4):
        mine = [p for rnd in rounds for p in rnd[m]]
        nbytes, _ = _blocks_read(mine, chunks, itemsize, 4096, gap=1 << 20)
        assert nbytes == 4 * (64 << 10)


def _unit(nbytes: int = 8 * MIB) -> Unit:
    return Unit((0, 1, 2), None, "cpu", ["w"], nbytes, "d1")


def _report(mode: str, host: str = "h", digest: str = "d1") -> dict:
    return {"failed": False, "mode": mode, "host": host, "units": {_unit().uid: digest}}


def test_decide():
    u = _unit()
    assert decide(u, {r: _report("remote") for r in u.ranks}, MIB)
    assert not decide(u, {r: _report("local") for r in u.ranks}, MIB)  # one host's page cache already dedups
    assert decide(u, {r: _report("local", host=f"h{r // 2}") for r in u.ranks}, MIB)  # a shared FS over hosts
    assert not decide(u, {**{r: _report("remote") for r in u.ranks}, 2: _report("never")}, MIB)
    assert not decide(u, {**{r: _report("remote") for r in u.ranks}, 1: _report("remote", digest="d2")}, MIB)
    assert not decide(u, {0: _report("remote"), 1: _report("remote")}, MIB)  # rank 2 is not in the load
    small = _unit(MIB - 1)
    assert not decide(small, {r: _report("remote") for r in u.ranks}, MIB)
    assert decide(small, {r: _report("always") for r in u.ranks}, MIB)
    assert decide(u, {r: _report("always") for r in u.ranks}, MIB)


def test_rank_mode():
    assert rank_mode(True, False, True) == "always"
    assert rank_mode("auto", True, False) == "remote"
    assert rank_mode("auto", False, False) == "local"
    assert rank_mode("auto", True, True) == "never"
