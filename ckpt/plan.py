"""Save planning: which rank writes which chunk, decided by each rank from what it can derive.

A DTensor's cells, holders and writers follow from (shape, mesh, placements) (ckpt/rules.py),
so a rank plans its DTensor chunks alone: no rank needs another rank's boxes, and such a
tensor is stored as a rule. What a rank cannot derive comes from one small all-gather (a
fingerprint of the rank's *class*, its explicit ``Sharded`` boxes, its error) and one broadcast
per distinct class: ranks with the same keys, shapes, dtypes and DTensor specs form a class
(one under FSDP, one per stage under pipelining), and a class's descriptor says which ranks
hold each plain tensor. Plain tensors and ``Sharded`` boxes (O(T) work, not O(W x T)) are
assigned largest-first to the least-loaded holder, identically on every rank.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from . import agree
from .describe import TensorEntry
from .errors import UnsupportedValueError
from .format import Mesh, Rule, dtype_from_name, dtype_name, itemsize
from .regions import Box, split_into_chunks, tiling_defect
from .rules import grid, holders_of, writer

# A class descriptor (rank-independent, JSON-able):
#   {"tensors": {key: {"shape", "dtype", "layout", and "mesh" (index into "meshes") + "placements"
#    for a DTensor, or "sharded": true}}, "meshes": [{"shape", "ranks"}]}
# A rank's own part: {key: [[offsets, sizes], ...]} for its Sharded tensors.
Descriptor = dict[str, Any]


class Exchange(Protocol):
    """The collectives planning needs: torch.distributed in a job, a simulation in bench_scale."""

    rank: int
    world: int

    def all_gather(self, obj: Any) -> list[Any]: ...

    def broadcast(self, obj: Any, src: int) -> Any: ...


def rank_descriptor(tensors: dict[str, TensorEntry], group_rank: Callable[[int], int] = int) -> tuple[Descriptor, dict]:
    """(class descriptor, own Sharded boxes) of this rank; ``group_rank`` maps a global rank
    to the save group's (-1: not in it)."""
    meshes: dict[tuple, int] = {}
    by_id: dict[int, int] = {}  # describe shares one mesh tuple between the tensors on it
    out: dict[str, Any] = {}
    own: dict[str, list] = {}
    for key, e in tensors.items():
        d: dict[str, Any] = {"shape": list(e.global_shape), "dtype": dtype_name(e.dtype, key), "layout": e.layout}
        if e.mesh is not None:
            if id(e.mesh) not in by_id:
                mesh = (tuple(e.mesh[0]), tuple(group_rank(r) for r in e.mesh[1]))
                by_id[id(e.mesh)] = meshes.setdefault(mesh, len(meshes))
            d["mesh"] = by_id[id(e.mesh)]
            d["placements"] = list(e.placements)
        elif e.layout == "sharded":
            d["sharded"] = True
            own[key] = [[list(p.box.offsets), list(p.box.sizes)] for p in e.pieces]
        out[key] = d
    return {"tensors": out, "meshes": [{"shape": list(s), "ranks": list(r)} for s, r in meshes]}, own


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(desc: Descriptor, own: dict, world_size: int, chunk_bytes: int) -> str:
    """Identifies a state-dict structure, to reuse a plan without collectives."""
    return _digest([desc, own, world_size, chunk_bytes])


@dataclass(frozen=True)
class WriteItem:
    """Write ``chunk`` of tensor ``key``, taken from local piece number ``piece``."""

    key: str
    chunk: Box
    piece: int


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str
    rule: Rule | None = None  # stored by rule (chunk records in object indexes)


@dataclass
class SavePlan:
    token: str  # unique per plan; with a counter, names each save's objects
    world_size: int
    items: list[WriteItem]  # this rank's
    tensors: dict[str, TensorMeta]  # global view, for the manifest
    meshes: list[Mesh] = field(default_factory=list)  # the rules' meshes
    leader: bool = True  # the first rank of its class: its index carries the class's structure

    @property
    def rule_keys(self) -> set[str]:
        return {k for k, m in self.tensors.items() if m.rule is not None}


def make_save_plan(
    desc: Descriptor,
    own: dict,
    error: BaseException | None,
    tensors: dict[str, TensorEntry],
    exchange: Exchange,
    chunk_bytes: int,
    token: str,
) -> SavePlan:
    """This rank's share of the save: every chunk of every tensor written by exactly one holder.

    Every rank's error (describe problems, ``CheckpointExistsError``) travels in the gather, so
    all ranks raise together with every rank's reason."""
    rank, world = exchange.rank, exchange.world
    cls = _digest(desc)
    gathered = exchange.all_gather({"class": cls, "own": own or None, "error": agree.record(error), "token": token})
    refused = agree.combined([g["error"] for g in gathered], "save")
    if refused is not None:
        raise refused from error
    members: dict[str, list[int]] = {}
    for r, g in enumerate(gathered):
        members.setdefault(g["class"], []).append(r)
    classes: list[tuple[list[int], Descriptor]] = []
    for c, ranks in members.items():
        got = exchange.broadcast(desc if rank == ranks[0] else None, ranks[0])
        if _digest(got) != c:
            raise UnsupportedValueError(f"cannot plan this save: rank {ranks[0]}'s descriptor changed in flight")
        classes.append((ranks, got))
    problems: list[str] = []
    metas, holders_of, meshes = _tensor_table(classes, world, chunk_bytes, problems)
    sharded = _sharded_boxes(gathered, metas, problems)
    if problems:
        raise UnsupportedValueError("cannot plan this save:\n  " + "\n  ".join(problems))

    mine = [
        item
        for key, e in tensors.items()
        if metas[key].rule is not None
        for item in _rule_items(key, e, metas[key], meshes, rank, chunk_bytes)
    ]
    mine += _balanced_items(metas, holders_of, sharded, tensors, rank, chunk_bytes)
    return SavePlan(gathered[0]["token"], world, mine, metas, meshes, leader=members[cls][0] == rank)


def _tensor_table(
    classes: list[tuple[list[int], Descriptor]], world: int, chunk_bytes: int, problems: list[str]
) -> tuple[dict[str, TensorMeta], dict[str, tuple[int, ...]], list[Mesh]]:
    """Every key's meta (consistent across classes), who holds each non-rule key, the rules' meshes."""
    mesh_ids: dict[tuple, int] = {}
    meshes: list[Mesh] = []
    seen: dict[str, tuple] = {}
    classes_of: dict[str, list[int]] = {}
    per_mesh: dict[int, dict[int, str]] = {}  # mesh id -> class -> digest of its specs on that mesh
    on_meshes: dict[str, set[int]] = {}
    layouts: dict[str, str] = {}
    metas: dict[str, TensorMeta] = {}
    for ci, (_, desc) in enumerate(classes):
        local_ids = []
        for m in desc["meshes"]:
            k = (tuple(m["shape"]), tuple(m["ranks"]))
            if k not in mesh_ids:
                mesh_ids[k] = len(meshes)
                meshes.append(Mesh(*k))
            local_ids.append(mesh_ids[k])
        on_mesh: dict[int, list] = {}
        for key, t in desc["tensors"].items():
            mid = local_ids[t["mesh"]] if "mesh" in t else None
            mesh_shape = None if mid is None else meshes[mid].shape
            spec = (tuple(t["shape"]), t["dtype"], mesh_shape, tuple(t.get("placements", ())), bool(t.get("sharded")))
            if seen.setdefault(key, spec) != spec:
                problems.append(f"{key}: ranks disagree on shape/dtype/placements: {seen[key]} vs {spec}")
                continue
            classes_of.setdefault(key, []).append(ci)
            layouts.setdefault(key, t["layout"])
            if mid is not None:
                on_mesh.setdefault(mid, []).append((key, spec))
                on_meshes.setdefault(key, set()).add(mid)
        for mid, specs in on_mesh.items():
            per_mesh.setdefault(mid, {})[ci] = _digest(sorted(specs))
    # A DTensor is stored by rule when non-empty; held on several meshes of one shape (a copy per
    # replica group), its cells' holders are those of every mesh.
    for key, (shape, dtype, _, placements, _) in seen.items():
        mids = tuple(sorted(on_meshes.get(key, ())))
        rule = Rule(mids, placements, chunk_bytes) if mids and shape and math.prod(shape) > 0 else None
        metas[key] = TensorMeta(shape, dtype_from_name(dtype), layouts[key], rule)
    class_of_rank = {r: ci for ci, (ranks, _) in enumerate(classes) for r in ranks}
    for mid, digests in per_mesh.items():
        mesh = meshes[mid]
        want = digests[min(digests)]
        bad = [r for r in mesh.ranks if not 0 <= r < world or digests.get(class_of_rank.get(r, -1)) != want]
        if bad:
            problems.append(
                f"DTensor mesh {list(mesh.shape)} over ranks {_ranks_str(mesh.ranks)}: ranks {_ranks_str(bad)} are "
                "outside the save's process group or do not hold the same DTensors on it"
            )
    holders_of: dict[str, tuple[int, ...]] = {}
    by_classes: dict[tuple[int, ...], tuple[int, ...]] = {}
    for key, cis in classes_of.items():
        if metas[key].rule is None and not seen[key][4]:
            ck = tuple(cis)
            if ck not in by_classes:
                by_classes[ck] = tuple(sorted(r for ci in cis for r in classes[ci][0]))
            holders_of[key] = by_classes[ck]
    return metas, holders_of, meshes


def _ranks_str(ranks) -> str:
    ranks = list(ranks)
    return str(ranks) if len(ranks) <= 8 else f"[{', '.join(map(str, ranks[:8]))}, ... ({len(ranks)})]"


def _sharded_boxes(
    gathered: list[dict], metas: dict[str, TensorMeta], problems: list[str]
) -> dict[str, dict[Box, list]]:
    """key -> distinct box -> [(rank, piece)], checked to tile each tensor exactly."""
    out: dict[str, dict[Box, list[tuple[int, int]]]] = {}
    for r, g in enumerate(gathered):
        for key, boxes in (g["own"] or {}).items():
            shape = metas[key].shape
            per = out.setdefault(key, {})
            for i, (off, size) in enumerate(boxes):
                b = Box(tuple(off), tuple(size))
                if b.is_empty() and math.prod(shape) > 0:
                    continue
                per.setdefault(b, []).append((r, i))
    for key, per in list(out.items()):
        shape = metas[key].shape
        if math.prod(shape) == 0:
            out[key] = {Box.full(shape): [h for hs in per.values() for h in hs][:1]}
            continue
        problem = coverage_problem(key, shape, list(per))
        if problem:
            problems.append(problem)
    return out


def _rule_items(
    key: str, e: TensorEntry, meta: TensorMeta, meshes: list[Mesh], rank: int, chunk_bytes: int
) -> list[WriteItem]:
    """This rank's chunks of a rule tensor: of each cell it holds, those the rule gives it."""
    assert meta.rule is not None
    on = [meshes[m] for m in meta.rule.meshes]
    g = grid(meta.shape, on[0].shape, meta.rule.placements)
    size = itemsize(meta.dtype)
    items = []
    for i, piece in enumerate(e.pieces):
        if piece.box.is_empty():
            continue
        cells = list(g.cells_in(piece.box))
        if len(cells) != 1 or cells[0][0] != piece.box:
            raise UnsupportedValueError(f"{key}: shard {piece.box} is not one cell of its DTensor layout")
        cell, coord = cells[0]
        holders = holders_of(g, on, coord)
        for c, chunk in enumerate(split_into_chunks(cell, size, chunk_bytes)):
            if writer(key, cell, c, holders) == rank:
                items.append(WriteItem(key, chunk, i))
    return items


def _balanced_items(
    metas: dict[str, TensorMeta],
    holders_of: dict[str, tuple[int, ...]],
    sharded: dict[str, dict[Box, list[tuple[int, int]]]],
    tensors: dict[str, TensorEntry],
    rank: int,
    chunk_bytes: int,
) -> list[WriteItem]:
    """Plain tensors and Sharded boxes: single-holder chunks first, then largest first to the
    least-loaded holder (ties to the lowest rank); the same result on every rank."""
    work: list[tuple[int, str, Box, tuple[int, ...], tuple[int, ...]]] = []  # bytes, key, chunk, holders, pieces
    for key, holders in holders_of.items():
        meta = metas[key]
        size = itemsize(meta.dtype)
        for chunk in split_into_chunks(Box.full(meta.shape), size, chunk_bytes):
            work.append((chunk.numel * size, key, chunk, holders, (0,) * len(holders)))
    for key, per in sharded.items():
        size = itemsize(metas[key].dtype)
        for box, owners in sorted(per.items()):
            ranks, pieces = tuple(r for r, _ in owners), tuple(p for _, p in owners)
            for chunk in split_into_chunks(box, size, chunk_bytes):
                work.append((chunk.numel * size, key, chunk, ranks, pieces))
    work.sort(key=lambda w: (len(w[3]) > 1, -w[0], w[1], w[2]))
    load: dict[int, int] = {}
    heaps: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    mine = []
    for nbytes, key, chunk, holders, pieces in work:
        if len(holders) == 1:
            r = holders[0]
        else:
            heap = heaps.get(holders)
            if heap is None:
                heap = heaps[holders] = sorted((load.get(h, 0), h) for h in holders)
            while True:  # lazy deletion: loads only grow, so a stale entry is re-pushed with its current load
                seen_load, r = heap[0]
                if seen_load == load.get(r, 0):
                    break
                heapq.heapreplace(heap, (load.get(r, 0), r))
            heapq.heapreplace(heap, (seen_load + nbytes, r))
        load[r] = load.get(r, 0) + nbytes
        if r == rank:
            mine.append(WriteItem(key, chunk, pieces[holders.index(r)]))
    return mine


def coverage_problem(key: str, shape: tuple[int, ...], boxes: list[Box]) -> str | None:
    """Whether distinct ``boxes`` tile ``shape`` exactly (inside it, no overlap, no gap), at any
    box count (``regions.tiling_defect``)."""
    for b in boxes:
        if not b.fits_in(shape):
            return f"{key}: shard {b} lies outside global shape {shape}"
    if math.prod(shape) == 0:
        return None
    defect = tiling_defect(shape, boxes)
    if defect is None:
        return None
    at = Box(defect, (1,) * len(defect))
    holding = [b for b in boxes if b.contains(at)]
    if len(holding) > 1:
        return f"{key}: shards {holding[0]} and {holding[1]} overlap without being identical"
    return f"{key}: the ranks' shards do not cover element {list(defect)} of {list(shape)}"
