"""DTensor placements -> pieces, checked against torch's own sharding without processes.

For random shapes, meshes and placement lists (``Shard``, ``_StridedShard`` with any
split factor, ``Replicate``), every mesh coordinate's local tensor is cut from an
``arange`` global tensor by torch's own ``_split_tensor`` applied left to right (what
``distribute_tensor`` does), and each piece ckpt describes must hold exactly those
elements: the box of the global tensor equals the local slice it names, the pieces
tile the local tensor, and all coordinates together cover the global tensor.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from ckpt.describe import dtensor_pieces
from ckpt.errors import UnsupportedValueError
from ckpt.regions import chunk_bounds, concat_runs, select_runs


def torch_local(global_t: torch.Tensor, mesh_shape, coord, placements) -> torch.Tensor:
    """The local tensor at ``coord`` as torch's placements cut it (distribute_tensor's splitting)."""
    t = global_t
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, (Shard, _StridedShard)):
            shards, _ = p._split_tensor(t, mesh_shape[mesh_dim], with_padding=False, contiguous=True)
            t = shards[coord[mesh_dim]]
    return t


@st.composite
def layouts(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 13), min_size=ndim, max_size=ndim)))
    mesh_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    placements = []
    for _ in mesh_shape:
        kind = draw(st.sampled_from(["r", "s", "ss"]))
        dim = draw(st.integers(0, ndim - 1))
        if kind == "r":
            placements.append(Replicate())
        elif kind == "s":
            placements.append(Shard(dim))
        else:
            placements.append(_StridedShard(dim, split_factor=draw(st.integers(1, 4))))
    return shape, mesh_shape, tuple(placements)


def check_layout(shape, mesh_shape, placements) -> None:
    global_t = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    seen = torch.zeros(shape, dtype=torch.bool)
    for coord in itertools.product(*(range(n) for n in mesh_shape)):
        want = torch_local(global_t, mesh_shape, coord, placements)
        local_shape, pieces = dtensor_pieces("w", shape, mesh_shape, coord, placements)
        torch_shape, torch_offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
        assert local_shape == tuple(want.shape) == tuple(torch_shape)
        covered = torch.zeros(local_shape, dtype=torch.int64)
        for p in pieces:
            local_slices = tuple(slice(o, o + s) for o, s in zip(p.local, p.box.sizes))
            assert torch.equal(want[local_slices], global_t[p.box.slices()]), (coord, p)
            covered[local_slices] += 1
            seen[p.box.slices()] = True
        assert bool((covered == 1).all()), f"pieces at {coord} do not tile the local tensor once"
        if want.numel():
            assert pieces[0].box.offsets == tuple(torch_offset)
    assert bool(seen.all()), "the coordinates' pieces do not cover the global tensor"


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(layouts())
def test_pieces_hold_exactly_what_torch_places_there(layout) -> None:
    check_layout(*layout)


@pytest.mark.parametrize(
    "shape,mesh_shape,placements",
    [
        # FSDP2 over TP, column-parallel weight: rows sharded by TP first, then by FSDP
        ((8, 8), (2, 2), (_StridedShard(0, split_factor=2), Shard(0))),
        # FSDP2 over TP, row-parallel weight, and a replicated (norm) weight
        ((8, 6), (2, 2), (Shard(0), Shard(1))),
        ((8,), (2, 2), (Shard(0), Replicate())),
        # uneven: 9 rows, the strided parts of different lengths, some ranks short
        ((9, 3), (4, 2), (_StridedShard(0, split_factor=2), Shard(0))),
        # HSDP over TP: replicate x shard x tp
        ((12, 4), (2, 2, 2), (Replicate(), _StridedShard(0, split_factor=2), Shard(0))),
        # the example in torch's _utils: S(0) then SS(0, 2)
        ((8,), (2, 2), (Shard(0), _StridedShard(0, split_factor=2))),
    ],
)
def test_layouts_real_jobs_produce(shape, mesh_shape, placements) -> None:
    check_layout(shape, mesh_shape, placements)


def test_strided_shard_local_tensor_is_several_boxes() -> None:
    # rank (0, 1) of FSDP2 over TP, 8 rows: TP rank 1 holds rows 4..7, FSDP rank 0 of that
    # is rows 4..5; _StridedShard describes the same rows left to right.
    shape, pieces = dtensor_pieces("w", (8, 4), (2, 2), (1, 0), (_StridedShard(0, split_factor=2), Shard(0)))
    assert shape == (2, 4)
    assert [(p.box.offsets, p.box.sizes, p.local) for p in pieces] == [((2, 0), (2, 4), (0, 0))]
    shape, pieces = dtensor_pieces("w", (8, 4), (2, 2), (0, 0), (_StridedShard(0, split_factor=2), Shard(1)))
    assert shape == (4, 2)
    boxes = [(p.box.offsets, p.box.sizes, p.local) for p in pieces]
    assert boxes == [((0, 0), (2, 2), (0, 0)), ((4, 0), (2, 2), (2, 0))]


@pytest.mark.parametrize("placement", [Partial(), Partial("max")])
def test_partial_is_refused_naming_key_and_placement(placement) -> None:
    with pytest.raises(UnsupportedValueError) as e:
        dtensor_pieces("layers.0.mlp.w1.weight", (4, 4), (2, 2), (0, 1), (Shard(0), placement))
    msg = str(e.value)
    assert "layers.0.mlp.w1.weight" in msg and repr(placement) in msg and "mesh dim 1" in msg
    assert "partial" in msg.lower()


@given(st.integers(0, 40), st.integers(1, 9))
def test_chunk_bounds_match_torch_chunk(size, parts) -> None:
    chunks = list(torch.arange(size).chunk(parts)) if size else []
    for i in range(parts):
        lo, hi = chunk_bounds(size, parts, i)
        want = chunks[i].tolist() if i < len(chunks) else []
        assert list(range(lo, hi)) == want


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 5)), max_size=5), st.data())
def test_select_and_concat_runs_follow_the_index_lists(runs, data) -> None:
    runs = tuple(runs)
    indices = [g + k for g, c in runs for k in range(c)]
    lo = data.draw(st.integers(0, len(indices)))
    hi = data.draw(st.integers(lo, len(indices)))
    picked = select_runs(runs, lo, hi)
    assert [g + k for g, c in picked for k in range(c)] == indices[lo:hi]
    assert all(a + c != b for (a, c), (b, _) in zip(picked, picked[1:])), "adjacent runs left unmerged"
    both = concat_runs([picked, runs])
    assert [g + k for g, c in both for k in range(c)] == indices[lo:hi] + indices
