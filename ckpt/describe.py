"""State dict -> flat entries: each tensor becomes a set of pieces of a global tensor.

This is the one place that knows about DTensor placements and the explicit
shard descriptors (``Sharded``) of frameworks that do not use DTensor. Past it,
everything is a region of a global tensor.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from .errors import UnsupportedValueError
from .regions import Box, Runs, Shape, cut_runs, flat_range_to_boxes, runs_length
from .values import encode, encode_checked, unsupported


@dataclass(frozen=True)
class Piece:
    """A box of the global tensor and where it sits in the local tensor.

    ``local`` is either n-d offsets into the local tensor (the box is the slice
    starting there) or an int: a flat offset into the contiguous local tensor,
    whose next ``box.numel`` elements are the box in row-major order.
    """

    box: Box
    local: tuple[int, ...] | int


@dataclass
class Sharded:
    """A local tensor that holds part of a global tensor, for code without DTensor.

    Build it with :meth:`box` (Megatron TP), :meth:`flat` (ZeRO / distributed
    optimizer partitions) or :meth:`pieces` (fused QKV / gate-up under TP).
    ``ckpt.load`` writes into ``tensor`` in place.
    """

    tensor: torch.Tensor
    global_shape: Shape
    parts: tuple[Piece, ...]

    @classmethod
    def box(cls, tensor: torch.Tensor, global_shape: Sequence[int], offsets: Sequence[int]) -> Sharded:
        """``tensor`` is ``global[offsets : offsets + tensor.shape]``."""
        return cls(tensor, tuple(global_shape), (Piece(Box(tuple(offsets), tuple(tensor.shape)), (0,) * tensor.dim()),))

    @classmethod
    def flat(
        cls,
        tensor: torch.Tensor,
        global_shape: Sequence[int],
        start: int,
        within: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> Sharded:
        """``tensor`` (1-D) is ``global.flatten()[start : start + tensor.numel()]``.

        With ``within=(offsets, sizes)`` the range is of the flattened box
        ``global[offsets : offsets + sizes]`` instead: a distributed optimizer under
        TP partitions the flattened TP shards, not the global tensors.
        """
        if tensor.dim() != 1:
            raise ValueError(f"a flat shard must be 1-D, got shape {tuple(tensor.shape)}")
        outer = Box.full(global_shape) if within is None else Box(tuple(within[0]), tuple(within[1]))
        parts, at = [], 0
        for b in flat_range_to_boxes(start, start + tensor.numel(), outer.sizes):
            parts.append(Piece(Box(tuple(o + i for o, i in zip(outer.offsets, b.offsets)), b.sizes), at))
            at += b.numel
        return cls(tensor, tuple(global_shape), tuple(parts))

    @classmethod
    def pieces(
        cls,
        tensor: torch.Tensor,
        global_shape: Sequence[int],
        pieces: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
    ) -> Sharded:
        """Several boxes in one local tensor: ``(global_offsets, local_offsets, sizes)`` each."""
        return cls(
            tensor,
            tuple(global_shape),
            tuple(Piece(Box(tuple(g), tuple(s)), tuple(loc)) for g, loc, s in pieces),
        )


@dataclass
class TensorEntry:
    """One tensor of a state dict: its local tensor and the pieces of the global tensor it holds."""

    key: str
    local: torch.Tensor
    global_shape: Shape
    pieces: tuple[Piece, ...]
    layout: str
    # A DTensor's (mesh shape, global rank at each mesh position) and placements as JSON strings
    # (``placement_json``): enough for any rank to compute every rank's pieces (ckpt/rules.py).
    mesh: tuple[Shape, tuple[int, ...]] | None = None
    placements: tuple[str, ...] = ()
    device_mesh: Any = None  # a DTensor's DeviceMesh: the process groups of its replicas (ckpt/share.py)

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype


def local_view(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The part of ``tensor`` that holds ``piece.box``, shaped like the box."""
    if isinstance(piece.local, int):
        return tensor.view(-1)[piece.local : piece.local + piece.box.numel].view(piece.box.sizes)
    return tensor[Box(piece.local, piece.box.sizes).slices()]


def describe_tensor(key: str, value: Any) -> TensorEntry:
    if isinstance(value, DTensor):
        return _describe_dtensor(key, value)
    if isinstance(value, Sharded):
        entry = TensorEntry(key, value.tensor, value.global_shape, value.parts, "sharded")
        _check_pieces(entry)
        return entry
    if value.is_nested or value.is_sparse or value.layout != torch.strided:
        raise UnsupportedValueError(f"{key}: {value.layout} tensors cannot be stored; convert to dense first")
    shape = tuple(value.shape)
    return TensorEntry(key, value, shape, (Piece(Box.full(shape), (0,) * len(shape)),), "replicated")


def _describe_dtensor(key: str, dt: DTensor) -> TensorEntry:
    shape = tuple(dt.shape)
    local_shape, pieces, layout, rule = _dtensor_layout(key, shape, dt.device_mesh, tuple(dt.placements))
    with torch.no_grad():  # a view of the local shard, without autograd bookkeeping
        local = dt.to_local()
    if tuple(local.shape) != local_shape:
        raise UnsupportedValueError(f"{key}: local shape {tuple(local.shape)} does not match its placements")
    return TensorEntry(key, local, shape, pieces, layout, *rule, dt.device_mesh)


_layouts: dict[tuple, tuple[Shape, tuple[Piece, ...], str, tuple]] = {}


def _dtensor_layout(key: str, shape: Shape, mesh, placements: tuple) -> tuple[Shape, tuple[Piece, ...], str, tuple]:
    """(local shape, pieces, description, (mesh, placements as JSON)) of this rank's shard,
    cached: the same layout recurs for every save, and computing it costs ~0.1 ms a tensor."""
    cache_key = (shape, mesh, placements)
    found = _layouts.get(cache_key)
    if found is not None:
        return found
    coord = mesh.get_coordinate()
    if coord is None:
        raise UnsupportedValueError(f"{key}: this rank is not in the DTensor's mesh {mesh}")
    local_shape, pieces = dtensor_pieces(key, shape, tuple(mesh.shape), tuple(coord), placements)
    names = tuple(placement_json(p) for p in placements)
    rule = ((tuple(mesh.shape), tuple(mesh.mesh.flatten().tolist())), names) if None not in names else (None, ())
    found = (local_shape, pieces, f"DTensor(mesh={tuple(mesh.shape)}, placements={placements})", rule)
    _layouts[cache_key] = found
    return found


def placement_json(p: Placement) -> str | None:
    """A placement as a JSON string: ``R``, ``S<dim>``, ``S<dim>/<split factor>`` (``_StridedShard``),
    as rules store it (ckpt/rules.py); None for one that has no such form."""
    kind = type(p)
    if kind is Replicate:
        return "R"
    if kind is Shard:
        return f"S{p.dim}"
    if kind is _StridedShard:
        return f"S{p.dim}/{int(p.split_factor)}"
    return None


def dtensor_pieces(
    key: str, shape: Shape, mesh_shape: Shape, coord: Shape, placements: Sequence[Placement]
) -> tuple[Shape, tuple[Piece, ...]]:
    """(local shape, pieces) of the shard at mesh coordinate ``coord``, as DTensor lays it out.

    Placements apply left to right, each cutting what the previous ones left along its
    tensor dim: ``Shard`` takes one ``torch.chunk`` part; ``_StridedShard(d, sf)`` (FSDP2
    over TP: the mesh dims to its right already sharded ``d`` into ``sf`` parts) cuts the
    held rows into ``sf`` parts and takes the same ``torch.chunk`` part of each, so one
    local tensor holds ``sf`` separate row blocks. Each tensor dim thus holds a list of
    runs of global indices; the pieces are their products. ``Partial`` (unreduced values)
    and unknown placements are refused, naming the key.
    """
    runs: list[Runs] = [((0, n),) if n else () for n in shape]
    for mesh_dim, p in enumerate(placements):
        kind = type(p)
        if kind is Replicate:
            continue
        if kind not in (Shard, _StridedShard):
            why = "holds unreduced partial values" if isinstance(p, Partial) else "is not supported"
            raise UnsupportedValueError(
                f"{key}: placement {p!r} on mesh dim {mesh_dim} {why}; redistribute to Shard/Replicate before saving"
            )
        split = 0 if kind is Shard else int(p.split_factor)
        runs[p.dim] = cut_runs(runs[p.dim], mesh_shape[mesh_dim], coord[mesh_dim], split)
    local_shape = tuple(runs_length(r) for r in runs)
    if 0 in local_shape:
        offsets = tuple(r[0][0] if r else n for r, n in zip(runs, shape))
        return local_shape, (Piece(Box(offsets, local_shape), (0,) * len(shape)),)
    pieces = []
    for combo in itertools.product(*(_with_local_starts(r) for r in runs)):
        box = Box(tuple(g for g, _, _ in combo), tuple(c for _, _, c in combo))
        pieces.append(Piece(box, tuple(at for _, at, _ in combo)))
    return local_shape, tuple(pieces)


def _with_local_starts(runs: Runs) -> list[tuple[int, int, int]]:
    """(global start, local start, count) of each run."""
    out, at = [], 0
    for g, c in runs:
        out.append((g, at, c))
        at += c
    return out


def _check_pieces(entry: TensorEntry) -> None:
    for p in entry.pieces:
        if not p.box.fits_in(entry.global_shape):
            raise ValueError(f"{entry.key}: shard {p.box} lies outside global shape {entry.global_shape}")
        if isinstance(p.local, int):
            if not entry.local.is_contiguous():
                raise ValueError(f"{entry.key}: a flat shard must be contiguous")
            if p.local + p.box.numel > entry.local.numel():
                raise ValueError(f"{entry.key}: flat shard of {entry.local.numel()} elements is too short")
        elif len(p.local) != entry.local.dim() or any(
            o + s > n for o, s, n in zip(p.local, p.box.sizes, entry.local.shape)
        ):
            raise ValueError(f"{entry.key}: piece {p.box} does not fit local shape {tuple(entry.local.shape)}")


def is_tensor_like(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, Sharded))


def _holds_tensors(v: Any) -> bool:
    if is_tensor_like(v):
        return True
    if isinstance(v, dict):
        return any(_holds_tensors(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_holds_tensors(x) for x in v)
    return False


def _entered(v: Any) -> bool:
    """Dicts are always entered (an empty one is a leaf value); lists and tuples only when
    they hold tensors (a list of ints is one JSON leaf, as in DCP)."""
    return (isinstance(v, dict) and bool(v)) or (isinstance(v, (list, tuple)) and _holds_tensors(v))


@dataclass
class LeafRef:
    """Where a leaf sits in the caller's nested structure: its container and key (to assign on load)."""

    container: Any
    key: Any


def _path(parts: tuple) -> str:
    return "".join(f"[{p!r}]" for p in parts) or "<root>"


def walk(state_dict: Any, problems: list[str] | None = None, structure: list | None = None):
    """Yield (flat key, leaf, ref) for every leaf, in order; keys are joined with '.'.

    Problems (a key that is not a str or int, two paths that join to the same flat key)
    are appended to ``problems``, or raised at once without it. With ``structure`` (a
    one-element list), its element becomes the structure node of the state dict
    (see ckpt.structure).
    """
    found: list[str] = [] if problems is None else problems
    if not isinstance(state_dict, dict):
        raise UnsupportedValueError(f"a state dict must be a dict, got {type(state_dict).__name__}")
    seen: dict[str, tuple] = {}

    def visit(node: Any, prefix: str, parts: tuple) -> Iterator[tuple[str, Any, LeafRef]]:
        is_dict = isinstance(node, dict)
        entries: list = []
        for k, v in node.items() if is_dict else enumerate(node):
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                found.append(f"{prefix or '<root>'}: key {k!r} must be a str or int")
                if problems is None:
                    raise UnsupportedValueError(found[-1])
                continue
            key = f"{prefix}.{k}" if prefix else str(k)
            child = None
            if _entered(v):
                yield from visit(v, key, (*parts, k))
                child = structure_of[id(v)]
            else:
                if key in seen:
                    found.append(
                        f"{key}: {_path(seen[key])} and {_path((*parts, k))} both flatten to this key; "
                        "rename one (keys are joined with '.')"
                    )
                    if problems is None:
                        raise UnsupportedValueError(found[-1])
                seen[key] = (*parts, k)
                yield key, v, LeafRef(node, k)
            entries.append([k, child] if is_dict else child)
        kind = "dict" if is_dict else "tuple" if isinstance(node, tuple) else "list"
        structure_of[id(node)] = {kind: entries}

    structure_of: dict[int, Any] = {}
    yield from visit(state_dict, "", ())
    if structure is not None:
        structure[0] = structure_of[id(state_dict)]


def check_json_value(key: str, v: Any) -> None:
    """Raise, naming every bad part, for a value that cannot be stored without pickle."""
    encode_checked(v, key)


@dataclass
class Flat:
    """A state dict split into tensor entries, values (as given) and where each leaf sits."""

    tensors: dict[str, TensorEntry]
    values: dict[str, Any]
    refs: dict[str, LeafRef]
    structure: Any = None


def flatten(state_dict: dict, check_values: bool = True) -> Flat:
    """Split a state dict into tensors, values and leaf refs; every problem raised at once.

    ``check_values=False`` (a load target) skips checking that values can be stored.
    """
    flat = Flat({}, {}, {})
    problems: list[str] = []
    structure: list = [None]
    for key, leaf, ref in walk(state_dict, problems, structure):
        flat.refs[key] = ref
        if is_tensor_like(leaf):
            try:
                flat.tensors[key] = describe_tensor(key, leaf)
            except (UnsupportedValueError, ValueError) as e:
                problems.append(str(e))
        else:
            if check_values:
                encode(leaf, key, problems)
            flat.values[key] = leaf
    if problems:
        raise unsupported(problems)
    flat.structure = structure[0]
    return flat
