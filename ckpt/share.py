"""Read once, share across replicas: which rank of a replica group reads which bytes, and the broadcasts that
hand them to the others.

Ranks that hold identical local tensors form a *replica group*: every rank of the load for plain tensors
(taken to be replicated, as on save), and for a DTensor the ranks that differ only along a ``Replicate``
mesh dim (the HSDP / DDP replicas of a shard). Reading those bytes on every member costs storage k times
the bytes for k replicas; instead the group

1. agrees, in one small ``all_gather_object`` at the start of the load (:func:`agree`), on what each
   group holds (a digest of keys, layouts and the save being read) and whether sharing pays (:func:`decide`);
2. cuts its targets into parts, a target piece times a stored chunk, large ones cut again into row slabs
   where their edges can fall on checksum block edges, so no block is read twice (:func:`cut_parts`);
3. gives each member an equal run of storage, in rounds of about ``share_bucket_bytes`` (:func:`plan_rounds`);
4. per round, each member reads and verifies its parts through the ordinary read path, then broadcasts
   them (large contiguous parts straight from and into the target tensors, the rest packed into one buffer
   per owner); the next round's reads run while the current round's broadcasts are in flight
   (:func:`run`).

Every member computes the same plan from the same inputs, so no plan travels. Groups are run in one
global order (sorted by their ranks), so ranks in several groups never wait on each other crosswise.
A rank whose read fails keeps taking part in every broadcast (sending what it has) and raises at the end,
so the group never hangs and the load's final agreement makes every rank raise.

:func:`decide`, :func:`cut_parts` and :func:`plan_rounds` are pure and tested without processes; only
:func:`find_units`, :func:`agree` and :func:`run` touch ``torch.distributed``.
"""

from __future__ import annotations

import hashlib
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .describe import Piece, TensorEntry
from .fetch import target_view
from .format import Chunk, Manifest
from .options import LoadOptions
from .regions import Box, row_major_strides

DIRECT_MIN_BYTES = 256 << 10  # a contiguous part at least this large is broadcast in place, not packed
_ALIGN = 64  # packed parts start on a cache line (and so on any element size)


@dataclass(frozen=True)
class Part:
    """Global ``box`` of target ``key``'s piece ``piece``: read by one member, broadcast to the rest."""

    key: str
    piece: int
    box: Box
    nbytes: int  # bytes of its box as stored uncompressed: what the members are balanced by
    at: tuple[str, int] = ("", 0)  # (object, offset) of its first stored byte: members read runs of storage


Round = list[list[Part]]  # per member (in group order): the parts it reads and broadcasts in that round


def cut_parts(
    key: str, piece: int, box: Box, itemsize: int, chunks: list[Chunk], block_bytes: int, max_bytes: int
) -> list[Part]:
    """Parts covering ``box``: its intersection with each stored chunk, cut into row slabs of about ``max_bytes``.

    A slab edge must land on a checksum block boundary of the chunk, so that two members reading
    neighbouring slabs never both read (and verify) the block between them: an intersection whose rows
    are not contiguous in the chunk, or whose row edges meet no block edge within it, stays whole.
    """
    out = []
    for c in chunks:
        inter = c.box.intersect(box)
        if inter is not None and inter.numel:
            strides = row_major_strides(c.box.sizes)
            for b in _slabs(inter, c.box, itemsize, block_bytes, max_bytes):
                first = sum(o * s for o, s in zip(b.relative_to(c.box).offsets, strides)) * itemsize
                out.append(Part(key, piece, b, b.numel * itemsize, (c.object, c.offset + first)))
    return out


def _slabs(inter: Box, chunk: Box, itemsize: int, block_bytes: int, max_bytes: int) -> list[Box]:
    if inter.numel * itemsize <= max_bytes:
        return [inter]
    d = next(i for i, s in enumerate(inter.sizes) if s > 1)  # exists: more than one element
    if any(inter.sizes[e] != chunk.sizes[e] for e in range(d + 1, inter.ndim)):
        return [inter]  # its rows are not contiguous in the chunk
    rows = inter.sizes[d]
    row = math.prod(inter.sizes[d + 1 :]) * itemsize
    start = sum(o * s for o, s in zip(inter.relative_to(chunk).offsets, row_major_strides(chunk.sizes))) * itemsize
    period = block_bytes // math.gcd(block_bytes, row)  # rows from one row edge on a block edge to the next
    first = next((i for i in range(min(period, rows)) if (start + i * row) % block_bytes == 0), None)
    if first is None or (first == 0 and period >= rows):  # no row edge inside meets a block edge
        return [inter]
    step = max(period, max_bytes // row // period * period)
    cuts = sorted({0, rows, *range(first, rows, step)})
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        offsets = tuple(o + lo if i == d else o for i, o in enumerate(inter.offsets))
        sizes = tuple(hi - lo if i == d else s for i, s in enumerate(inter.sizes))
        out.append(Box(offsets, sizes))
    return out


def plan_rounds(parts: list[Part], members: int, round_bytes: int) -> list[Round]:
    """Who reads which part, and when. In storage order, the parts are cut into ``members`` runs of about
    equal bytes (a part goes to the run its middle byte falls in), so each member reads a few long ranges,
    never reading through another member's bytes; each run is then cut into rounds of about
    ``round_bytes / members``."""
    order = sorted(range(len(parts)), key=lambda i: (parts[i].at, i))
    total = sum(p.nbytes for p in parts)
    runs: list[list[Part]] = [[] for _ in range(members)]
    before = 0
    for i in order:
        n = parts[i].nbytes
        runs[min(members - 1, (2 * before + n) * members // max(1, 2 * total))].append(parts[i])
        before += n
    per = max(1, round_bytes // members)
    batches: list[list[list[Part]]] = []
    for run in runs:
        cut: list[list[Part]] = []
        size = 0
        for part in run:
            if not cut or (size and size + part.nbytes > per):
                cut.append([])
                size = 0
            cut[-1].append(part)
            size += part.nbytes
        batches.append(cut)
    n = max((len(b) for b in batches), default=0)
    return [[b[r] if r < len(b) else [] for b in batches] for r in range(n)]


# -- who shares with whom --------------------------------------------------------------------------


@dataclass
class Unit:
    """A replica group and the targets its members all hold: ``ranks`` are global, in group order."""

    ranks: tuple[int, ...]
    group: Any
    device: str
    keys: list[str] = field(default_factory=list)
    nbytes: int = 0
    digest: str = ""

    @property
    def uid(self) -> str:
        return hashlib.blake2b(repr((self.ranks, self.device)).encode(), digest_size=8).hexdigest()


def backend_devices(group: Any) -> set[str]:
    """Device types ``group``'s backend broadcasts (gloo: CPU; nccl: CUDA; "cpu:gloo,cuda:nccl": both)."""
    import torch.distributed as dist

    name = str(dist.get_backend(group))
    if ":" in name:
        return {pair.split(":")[0] for pair in name.split(",")}
    return {"gloo": {"cpu"}, "nccl": {"cuda"}}.get(name, set())


def _replicas(entry: TensorEntry, group: Any, load_ranks: tuple[int, ...]) -> tuple[tuple[int, ...], Any] | None:
    """The ranks holding exactly ``entry``'s local bytes, and their process group (None: none to share with)."""
    import torch.distributed as dist

    if any(isinstance(p.local, int) for p in entry.pieces) or entry.local.numel() == 0:
        return None  # flat (ZeRO) pieces and empty shards
    if entry.device_mesh is None:
        return (load_ranks, group) if entry.layout == "replicated" else None
    mesh = entry.device_mesh
    dims = [d for d, p in enumerate(entry.placements) if p == "R" and mesh.size(d) > 1]
    if not dims:
        return None
    if len(dims) > 1:  # replicated over the whole load (all of a 1-job mesh): the load's own group
        coord = mesh.get_coordinate()
        index = tuple(slice(None) if d in dims else c for d, c in enumerate(coord))
        if sorted(mesh.mesh[index].flatten().tolist()) == sorted(load_ranks):
            return load_ranks, group
    d = max(dims, key=lambda d: (mesh.size(d), -d))  # else one dim: several would need a flattened group
    sub = mesh.get_group(d)
    return tuple(dist.get_process_group_ranks(sub)), sub


def find_units(targets: dict[str, TensorEntry], manifest: Manifest, group: Any) -> list[Unit]:
    """This rank's replica groups and what each holds, in the global order every rank runs them in."""
    import torch.distributed as dist

    load_ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
    units: dict[tuple[tuple[int, ...], str], Unit] = {}
    for key in sorted(targets):
        entry = targets[key]
        found = _replicas(entry, group, load_ranks)
        if found is None or len(found[0]) < 2 or not set(found[0]) <= set(load_ranks):
            continue
        ranks, sub = found
        device = entry.local.device.type
        if device not in backend_devices(sub):
            continue
        unit = units.setdefault((ranks, device), Unit(ranks, sub, device))
        unit.keys.append(key)
        unit.nbytes += entry.local.numel() * manifest.tensors[key].dtype.itemsize
    for unit in units.values():
        h = hashlib.blake2b(manifest.save_id.encode(), digest_size=16)
        for key in unit.keys:
            e = targets[key]
            h.update(
                repr((key, e.dtype, tuple(e.global_shape), tuple(e.local.shape), e.local.stride(), e.pieces)).encode()
            )
        unit.digest = h.hexdigest()
    return sorted(units.values(), key=lambda u: (u.ranks, u.device))


def rank_mode(option: bool | str, is_remote: bool, ram_tier: bool) -> str:
    """What this rank's settings say about sharing: "always" (True), or under "auto": "remote" (an object
    store: share), "local" (a file system: share only across hosts), "never" (RAM tier reads: node-local)."""
    if option is True:
        return "always"
    if ram_tier:
        return "never"
    return "remote" if is_remote else "local"


def decide(unit: Unit, reports: dict[int, dict], min_bytes: int) -> bool:
    """Whether ``unit`` is shared, from every member's report (global rank -> report); the same answer on
    every member, as it depends on gathered data only. A member that failed, or holds something else under
    the group (another layout, another save), turns sharing off for the group."""
    members = [reports.get(r) for r in unit.ranks]
    if any(m is None or m["units"].get(unit.uid) != unit.digest for m in members):
        return False
    modes = {m["mode"] for m in members}  # type: ignore[index]
    if "never" in modes:
        return False
    if modes == {"always"}:
        return True
    if unit.nbytes < min_bytes:
        return False
    return "local" not in modes or len({m["host"] for m in members}) > 1  # type: ignore[index]


def agree(units: list[Unit] | None, mode: str, options: LoadOptions, group: Any) -> list[Unit]:
    """The units this rank shares: one ``all_gather_object`` of each rank's report (host, mode, unit digests;
    ``units`` None: this rank already failed, and nobody shares). Every rank of the load must call it."""
    import torch.distributed as dist

    report = {
        "failed": units is None,
        "mode": mode,
        "host": socket.gethostname(),
        "units": {u.uid: u.digest for u in units or []},
    }
    out: list[dict | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, report, group=group)
    if units is None or any(r is None or r["failed"] for r in out):
        return []
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    reports = {rank: r for rank, r in zip(ranks, out) if r is not None}
    return [u for u in units if decide(u, reports, options.share_min_bytes)]


# -- running it ------------------------------------------------------------------------------------


Reader = Callable[[dict[str, TensorEntry]], None]


def run(
    units: list[Unit], targets: dict[str, TensorEntry], manifest: Manifest, read: Reader, options: LoadOptions
) -> None:
    """Fill every target of ``units``: read this rank's parts with ``read`` (the ordinary, verifying read of
    a dict of entries), broadcast them, receive the rest. Raises this rank's first read error at the end."""
    error: BaseException | None = None
    for unit in units:
        found = _run_unit(unit, targets, manifest, read, options)  # every unit runs: its members wait for us
        error = error or found
    if error is not None:
        raise error


def _run_unit(
    unit: Unit, targets: dict[str, TensorEntry], manifest: Manifest, read: Reader, options: LoadOptions
) -> BaseException | None:
    import torch.distributed as dist

    k = len(unit.ranks)
    me = unit.ranks.index(dist.get_rank())
    max_part = max(manifest.block_bytes, options.share_bucket_bytes // k)
    parts = []
    for key in unit.keys:
        rec, entry = manifest.tensors[key], targets[key]
        for i, p in enumerate(entry.pieces):
            chunks = rec.chunks_in(p.box)
            parts.extend(cut_parts(key, i, p.box, rec.dtype.itemsize, chunks, manifest.block_bytes, max_part))
    error: BaseException | None = None
    pending: _Transfers | None = None
    for rnd in plan_rounds(parts, k, options.share_bucket_bytes):
        if rnd[me] and error is None:
            try:
                read(_entries(rnd[me], targets))
            except Exception as e:  # keep broadcasting: the others wait for this rank's parts
                error = e
        transfers = _Transfers(unit, me, rnd, targets)
        if pending is not None:
            pending.finish()
        pending = transfers
    if pending is not None:
        pending.finish()
    return error


def _entries(parts: list[Part], targets: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """Entries that describe just ``parts``: each part a piece at its place in the local tensor."""
    pieces: dict[str, list[Piece]] = {}
    for part in parts:
        p = targets[part.key].pieces[part.piece]
        assert not isinstance(p.local, int)
        local = tuple(lo + (o - po) for lo, o, po in zip(p.local, part.box.offsets, p.box.offsets))
        pieces.setdefault(part.key, []).append(Piece(part.box, local))
    out = {}
    for key, ps in pieces.items():
        e = targets[key]
        out[key] = TensorEntry(key, e.local, e.global_shape, tuple(ps), e.layout)
    return out


def _view(part: Part, targets: dict[str, TensorEntry]) -> torch.Tensor:
    return target_view(targets[part.key], part.piece, part.box)


class _Transfers:
    """One round's broadcasts, started on construction (the owner's parts are read by then)."""

    def __init__(self, unit: Unit, me: int, rnd: Round, targets: dict[str, TensorEntry]) -> None:
        import torch.distributed as dist

        self.works: list[Any] = []
        self.unpack: list[tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]] = []
        for m, parts in enumerate(rnd):
            packed: list[tuple[int, torch.Tensor]] = []
            at = 0
            for part in parts:
                view = _view(part, targets)
                nbytes = view.numel() * view.element_size()
                if view.is_contiguous() and nbytes >= DIRECT_MIN_BYTES:
                    flat = view.reshape(-1).view(torch.uint8)
                    self.works.append(dist.broadcast(flat, src=unit.ranks[m], group=unit.group, async_op=True))
                else:
                    packed.append((at, view))
                    at += -(-nbytes // _ALIGN) * _ALIGN
            if not packed:
                continue
            buf = torch.empty(at, dtype=torch.uint8, device=packed[0][1].device)
            if m == me:
                for off, view in packed:
                    _slot(buf, off, view).copy_(view)
            else:
                self.unpack.append((buf, packed))
            self.works.append(dist.broadcast(buf, src=unit.ranks[m], group=unit.group, async_op=True))

    def finish(self) -> None:
        for w in self.works:
            w.wait()
        for buf, packed in self.unpack:
            for off, view in packed:
                view.copy_(_slot(buf, off, view))


def _slot(buf: torch.Tensor, off: int, view: torch.Tensor) -> torch.Tensor:
    """``view``'s place in a packed buffer, shaped and typed like it."""
    n = view.numel() * view.element_size()
    return buf[off : off + n].view(view.dtype).view(view.shape)
