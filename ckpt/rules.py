"""Regular shardings as rules: the cells a DTensor layout cuts a tensor into, who holds and who writes each.

Any rank computes them from (global shape, mesh, placements) alone, so the save planner needs no
other rank's boxes for a DTensor, and the manifest stores one rule per tensor instead of one
record per chunk (docs/FORMAT.md, "Version 2"). Per tensor dim, the placements on that dim cut
``[0, n)`` into segments (one run of global indices of some shard each, ``describe.cut_runs``); a
*cell* is a product of segments, held by every mesh position that agrees on the sharding mesh
dims (the replicate dims vary). A cell's chunks are its row-major slabs of at most
``chunk_bytes`` (``regions.split_into_chunks``), and chunk ``c`` of a cell is written by holder
``(crc32("<key>@<cell offsets>") + c) mod len(holders)``: balanced in count over the replicas,
and computable by a reader. Cells are found by bisection per dim, so a reader touches only the
cells its target intersects, whatever the world size.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from functools import lru_cache

from .format import Mesh
from .regions import Box, Runs, Shape, chunk_bounds, cut_all_runs, split_into_chunks

Segment = tuple[int, int, tuple[int, ...]]  # (first index, count, coordinates of the mesh dims cutting it)


def parse_placement(name: str) -> tuple[int, int] | None:
    """``describe.placement_json``'s string as (tensor dim, split factor; 0 for ``Shard``), None
    for ``R``; ValueError for anything else."""
    if name == "R":
        return None
    m = re.fullmatch(r"S(\d{1,4})(?:/([1-9]\d{0,5}))?", name)
    if m is None:
        raise ValueError(f"unknown placement {name!r}")
    return int(m.group(1)), int(m.group(2) or 0)


class Grid:
    """The cells of one (shape, mesh shape, placements), with the sharding coordinate of each."""

    def __init__(self, shape: Shape, mesh_shape: Shape, placements: tuple[str, ...]) -> None:
        if len(placements) != len(mesh_shape):
            raise ValueError(f"{len(placements)} placements for a mesh of {len(mesh_shape)} dims")
        ps = [parse_placement(p) for p in placements]
        self.shape, self.mesh_shape = shape, mesh_shape
        self.shard_dims = tuple(m for m, p in enumerate(ps) if p is not None)
        self.replicate_dims = tuple(m for m, p in enumerate(ps) if p is None)
        self.starts: list[list[int]] = []
        self.sizes: list[list[int]] = []
        self.owners: list[list[tuple[int, ...]]] = []  # per dim and segment: coords of the mesh dims on that dim
        self.steps: list[tuple[int, ...]] = []  # per dim: the mesh dims sharding it, in placement order
        for m in self.shard_dims:
            if not 0 <= ps[m][0] < len(shape):
                raise ValueError(f"placement {placements[m]} names a dim of a {len(shape)}-d tensor")
            if ps[m][1] > math.prod(mesh_shape):  # FSDP2 over TP splits by the mesh dims to its right
                raise ValueError(f"placement {placements[m]} splits by more than the mesh's ranks")
        for d, n in enumerate(shape):
            steps = [m for m in self.shard_dims if ps[m][0] == d]
            if len(steps) == 1 and not ps[steps[0]][1]:  # the common case, in closed form
                parts = mesh_shape[steps[0]]
                bounds = [chunk_bounds(n, parts, i) for i in range(parts)]
                segs = [(lo, hi - lo, (i,)) for i, (lo, hi) in enumerate(bounds) if hi > lo]
            else:
                cuts = [(mesh_shape[m], ps[m][1]) for m in steps]
                segs = list(_segments(((0, n),) if n else (), cuts, ()))
            segs.sort()
            at = 0
            for g, c, _ in segs:
                if g != at or c <= 0:
                    raise ValueError(f"placements {list(placements)} do not partition dim {d} of {list(shape)}")
                at += c
            if at != n:
                raise ValueError(f"placements {list(placements)} do not partition dim {d} of {list(shape)}")
            self.starts.append([g for g, _, _ in segs])
            self.sizes.append([c for _, c, _ in segs])
            self.owners.append([combo for _, _, combo in segs])
            self.steps.append(tuple(steps))

    def cells_in(self, box: Box) -> Iterator[tuple[Box, tuple[int, ...]]]:
        """(cell, coordinate on the sharding mesh dims) of every cell intersecting ``box``."""
        if box.is_empty():
            return
        ranges = []
        for d, (o, s) in enumerate(zip(box.offsets, box.sizes)):
            starts = self.starts[d]
            ranges.append(range(max(0, bisect.bisect_right(starts, o) - 1), bisect.bisect_left(starts, o + s)))
        for cell in itertools.product(*ranges):
            coord = [0] * len(self.mesh_shape)
            for d, j in enumerate(cell):
                for m, i in zip(self.steps[d], self.owners[d][j]):
                    coord[m] = i
            offsets = tuple(self.starts[d][j] for d, j in enumerate(cell))
            sizes = tuple(self.sizes[d][j] for d, j in enumerate(cell))
            yield Box(offsets, sizes), tuple(coord[m] for m in self.shard_dims)

    def holders(self, mesh: Mesh, shard_coord: tuple[int, ...]) -> tuple[int, ...]:
        """The ranks holding the cells at ``shard_coord``, in mesh order."""
        return _holders(self, mesh, shard_coord)


def _segments(runs: Runs, cuts: Sequence[tuple[int, int]], combo: tuple[int, ...]) -> Iterator[Segment]:
    """(start, count, coordinates) of every run the placement ``cuts`` (parts, split factor) leave of
    ``runs``, over all coordinates: depth first, each prefix of coordinates cut once and all parts of a
    cut in one pass (FSDP2 over TP at 4096 ranks: 513 passes, not 4096 strided and 4096 plain cuts)."""
    if not cuts:
        for g, c in runs:
            yield g, c, combo
        return
    (parts, split), rest = cuts[0], cuts[1:]
    for i, part in enumerate(cut_all_runs(runs, parts, split)):
        yield from _segments(part, rest, (*combo, i))


@lru_cache(maxsize=256)
def grid(shape: Shape, mesh_shape: Shape, placements: tuple[str, ...]) -> Grid:
    """The (cached) grid of a layout: layouts recur across tensors of a model."""
    return Grid(shape, mesh_shape, placements)


@lru_cache(maxsize=1 << 16)
def _holders(g: Grid, mesh: Mesh, shard_coord: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    coord = [0] * len(mesh.shape)
    for m, i in zip(g.shard_dims, shard_coord):
        coord[m] = i
    for rep in itertools.product(*(range(mesh.shape[m]) for m in g.replicate_dims)):
        for m, i in zip(g.replicate_dims, rep):
            coord[m] = i
        flat = 0
        for n, i in zip(mesh.shape, coord):
            flat = flat * n + i
        out.append(mesh.ranks[flat])
    return tuple(out)


def holders_of(g: Grid, meshes: Sequence[Mesh], shard_coord: tuple[int, ...]) -> tuple[int, ...]:
    """The holders of the cells at ``shard_coord`` over every mesh the tensor lives on, in mesh order."""
    if len(meshes) == 1:
        return g.holders(meshes[0], shard_coord)
    return tuple(r for m in meshes for r in g.holders(m, shard_coord))


def writer(key: str, cell: Box, index: int, holders: Sequence[int]) -> int:
    """The holder that writes chunk ``index`` of ``cell``: spread over replicas, the same on every rank."""
    seed = zlib.crc32(f"{key}@{','.join(map(str, cell.offsets))}".encode())
    return holders[(seed + index) % len(holders)]


def rule_chunks(
    key: str, g: Grid, meshes: Sequence[Mesh], itemsize: int, chunk_bytes: int, box: Box
) -> Iterator[tuple[Box, int, int]]:
    """(chunk box, index of the chunk in its cell, writer rank) of every stored chunk intersecting ``box``."""
    for cell, coord in g.cells_in(box):
        holders = holders_of(g, meshes, coord)
        for i, chunk in enumerate(split_into_chunks(cell, itemsize, chunk_bytes)):
            if chunk.intersect(box) is not None:
                yield chunk, i, writer(key, cell, i, holders)
