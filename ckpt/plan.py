"""Save planning: which rank writes which chunk ("what to move", not "where bytes go").

Every rank contributes a descriptor of what it holds; the plan is a pure
function of all descriptors, so each rank computes the same plan locally after
one all-gather and no rank-0 scatter is needed. Identical boxes held by several
ranks (replicated tensors, replicated mesh dimensions) are written once, by the
least-loaded holder.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from .describe import TensorEntry
from .errors import UnsupportedValueError
from .format import dtype_from_name, dtype_name, itemsize
from .regions import Box, split_into_chunks

# A descriptor is JSON-able: {key: {"shape": [...], "dtype": str, "layout": str, "boxes": [[offsets, sizes], ...]}}
Descriptor = dict[str, dict[str, Any]]


def rank_descriptor(tensors: dict[str, TensorEntry]) -> Descriptor:
    """What this rank holds, as the JSON the ranks exchange to plan a save."""
    return {
        key: {
            "shape": list(e.global_shape),
            "dtype": dtype_name(e.dtype, key),
            "layout": e.layout,
            "boxes": [[list(p.box.offsets), list(p.box.sizes)] for p in e.pieces],
        }
        for key, e in tensors.items()
    }


def fingerprint(desc: Descriptor, world_size: int, chunk_bytes: int) -> str:
    """Identifies a state-dict structure, to reuse a plan without collectives."""
    raw = json.dumps([desc, world_size, chunk_bytes], sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


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


@dataclass
class SavePlan:
    token: str  # unique per plan; with a counter, names each save's objects
    world_size: int
    items: list[WriteItem]  # this rank's
    tensors: dict[str, TensorMeta]  # global view, for the manifest
    bytes_per_rank: list[int]


def make_save_plan(descs: list[Descriptor], rank: int, chunk_bytes: int, token: str) -> SavePlan:
    """Assign every chunk of every tensor to exactly one rank that holds it."""
    world = len(descs)
    keys = sorted({k for d in descs for k in d})
    metas: dict[str, TensorMeta] = {}
    # (bytes, key, chunk, holders: [(rank, piece index)])
    work: list[tuple[int, str, Box, list[tuple[int, int]]]] = []
    problems = []
    for key in keys:
        holders = [(r, d[key]) for r, d in enumerate(descs) if key in d]
        shapes = {(tuple(h["shape"]), h["dtype"]) for _, h in holders}
        if len(shapes) > 1:
            problems.append(f"{key}: ranks disagree on shape/dtype: {sorted(shapes)}")
            continue
        ((shape, dtype_s),) = shapes
        dtype = dtype_from_name(dtype_s)
        metas[key] = TensorMeta(shape, dtype, holders[0][1]["layout"])
        boxes: dict[Box, list[tuple[int, int]]] = {}
        for r, h in holders:
            for i, (off, size) in enumerate(h["boxes"]):
                b = Box(tuple(off), tuple(size))
                if b.is_empty() and math.prod(shape) > 0:
                    continue
                boxes.setdefault(b, []).append((r, i))
        if math.prod(shape) == 0:
            boxes = {Box.full(shape): [h for hs in boxes.values() for h in hs][:1] or [(holders[0][0], 0)]}
        problem = _coverage_problem(key, shape, list(boxes))
        if problem:
            problems.append(problem)
            continue
        size = itemsize(dtype)
        for box, owners in sorted(boxes.items()):
            for chunk in split_into_chunks(box, size, chunk_bytes):
                work.append((chunk.numel * size, key, chunk, owners))
    if problems:
        raise UnsupportedValueError("cannot plan this save:\n  " + "\n  ".join(problems))

    load = [0] * world
    mine: list[WriteItem] = []
    # Chunks with a single holder are forced; place them first, then balance the rest largest-first.
    work.sort(key=lambda w: (len(w[3]) > 1, -w[0], w[1], w[2]))
    for nbytes, key, chunk, owners in work:
        r, piece = min(owners, key=lambda o: (load[o[0]], o[0]))
        load[r] += nbytes
        if r == rank:
            mine.append(WriteItem(key, chunk, piece))
    return SavePlan(token, world, mine, metas, load)


def _coverage_problem(key: str, shape: tuple[int, ...], boxes: list[Box]) -> str | None:
    total = math.prod(shape)
    for b in boxes:
        if not b.fits_in(shape):
            return f"{key}: shard {b} lies outside global shape {shape}"
    covered = sum(b.numel for b in boxes)
    if total == 0:
        return None
    if len(boxes) <= 64:
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                if a.intersect(b) is not None:
                    return f"{key}: shards {a} and {b} overlap without being identical"
    if covered != total:
        return f"{key}: the ranks' shards cover {covered} of {total} elements"
    return None
