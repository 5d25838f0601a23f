"""``ckpt.load``: match the caller's state dict to the manifest, read only the bytes
each local shard needs, verify them, and copy them in place."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .describe import TensorEntry, flatten, local_view
from .engine import as_bytes, checksum
from .errors import CheckpointNotFoundError, CorruptChunkError, StateDictMismatchError
from .format import MANIFEST, Manifest, TensorRecord, itemsize
from .ramtier import RamTierStorage
from .readplan import Need, Read, ReadSettings, Segment, intersect_chunks, plan_reads
from .regions import Box, span_view
from .storage import Storage

log = logging.getLogger("ckpt.load")


@dataclass
class LoadOptions:
    """How a load reads.

    strict: missing and unexpected keys are errors (shape mismatches always are).
    allow_dtype_cast: load a stored dtype into a target of another dtype.
    verify: check every byte read against its block checksum.
    max_gap_bytes / max_read_bytes: coalescing of neighbouring ranges into one request.
    io_threads: concurrent reads.
    daemon: a node-local ckpt-server (default $CKPT_DAEMON) whose RAM copy of this
        very save, if it has one, serves the objects it holds; the rest comes from storage.
    """

    strict: bool = True
    allow_dtype_cast: bool = False
    verify: bool = True
    max_gap_bytes: int = 1 << 20
    max_read_bytes: int = 64 << 20
    io_threads: int = 4
    storage_options: dict[str, Any] = field(default_factory=dict)
    daemon: str | None = field(default_factory=lambda: os.environ.get("CKPT_DAEMON") or None)


def read_manifest(storage: Storage) -> Manifest:
    where = storage.describe(MANIFEST)
    try:
        raw = storage.read_bytes(MANIFEST)
    except FileNotFoundError:
        hint = " (it holds uncommitted or partial data)" if storage.exists("") else ""
        raise CheckpointNotFoundError(f"{storage.uri}: no committed checkpoint{hint}") from None
    return Manifest.from_json_bytes(raw, where)


def load(
    state_dict: dict,
    uri: str,
    *,
    strict: bool | None = None,
    allow_dtype_cast: bool | None = None,
    options: LoadOptions | None = None,
) -> Manifest:
    """Load a checkpoint into ``state_dict`` in place, whatever its sharding.

    Tensors (plain, DTensor, ``Sharded``) are filled in place; JSON values are
    assigned into their containers. Returns the manifest (step, metrics, ...).
    """
    options = dataclasses.replace(options or LoadOptions())  # the caller's options stay as they were
    if strict is not None:
        options.strict = strict
    if allow_dtype_cast is not None:
        options.allow_dtype_cast = allow_dtype_cast
    storage: Storage | RamTierStorage = Storage(uri, **options.storage_options)
    manifest = read_manifest(storage)
    if options.daemon:
        storage = _with_ram_tier(storage, manifest, options.daemon)
    tensors, values, slots = flatten(state_dict)
    _check_match(manifest, tensors, values, options)
    read_tensors(storage, manifest, {k: e for k, e in tensors.items() if k in manifest.tensors}, options)
    for key in values:
        if key in manifest.values:
            _assign(slots[key], manifest.values[key])
    return manifest


def _with_ram_tier(storage: Storage, manifest: Manifest, daemon: str) -> Storage | RamTierStorage:
    """Serve objects from the daemon's RAM copy when it is a copy of this very save."""
    from .client import daemon_persister

    found = daemon_persister(daemon).lookup(storage.uri)
    if found is None:
        return storage
    save_id, directory, objects = found
    if save_id != manifest.save_id:
        log.info("%s: RAM copy is of save %s, storage has %s; reading storage", storage.uri, save_id, manifest.save_id)
        return storage
    return RamTierStorage(storage, directory, objects & set(manifest.objects))


def _check_match(manifest: Manifest, tensors: dict[str, TensorEntry], values: dict[str, Any], options: LoadOptions):
    problems = []
    for key, e in tensors.items():
        rec = manifest.tensors.get(key)
        if rec is None:
            if key in manifest.values:
                problems.append(f"{key}: the checkpoint holds a value here, not a tensor")
            elif options.strict:
                problems.append(f"{key}: missing from the checkpoint")
            continue
        if tuple(rec.shape) != tuple(e.global_shape):
            problems.append(f"{key}: shape {list(e.global_shape)} here, {list(rec.shape)} in the checkpoint")
        if rec.dtype != e.dtype and not options.allow_dtype_cast:
            problems.append(
                f"{key}: dtype {e.dtype} here, {rec.dtype} in the checkpoint (allow_dtype_cast=True to cast)"
            )
    for key in values:
        if key in manifest.tensors:
            problems.append(f"{key}: the checkpoint holds a tensor here, not a value")
        elif key not in manifest.values and options.strict:
            problems.append(f"{key}: missing from the checkpoint")
    if options.strict:
        unexpected = sorted((set(manifest.tensors) | set(manifest.values)) - set(tensors) - set(values))
        problems.extend(f"{key}: in the checkpoint but not in the state dict" for key in unexpected)
    if problems:
        raise StateDictMismatchError(problems)


def _assign(slot, value: Any) -> None:
    if isinstance(slot.container, tuple):
        raise StateDictMismatchError([f"{slot.key}: cannot assign a value inside a tuple"])
    old = slot.container[slot.key]
    slot.container[slot.key] = tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value


def read_tensors(storage: Storage, manifest: Manifest, targets: dict[str, TensorEntry], options: LoadOptions) -> None:
    """Fill each target's pieces from the stored chunks that intersect them."""
    needs: list[Need] = []
    for key, entry in targets.items():
        rec = manifest.tensors[key]
        size = itemsize(rec.dtype)
        for i, piece in enumerate(entry.pieces):
            got, covered = intersect_chunks(key, i, piece.box, rec.chunks, size, options.max_gap_bytes)
            if covered != piece.box.numel:
                raise CorruptChunkError(
                    f"{storage.uri}: {key}: stored chunks cover {covered} "
                    f"of the {piece.box.numel} elements of {piece.box}"
                )
            needs.extend(got)
    settings = ReadSettings(manifest.block_bytes, options.verify, options.max_gap_bytes, options.max_read_bytes)

    def direct_ok(n: Need) -> bool:
        entry = targets[n.key]
        if entry.dtype != manifest.tensors[n.key].dtype or entry.local.device.type != "cpu":
            return False
        return _target_view(entry, n.piece, n.chunk.box).is_contiguous()

    reads = plan_reads(needs, settings, direct_ok)
    worker = _ReadWorker(storage, manifest, targets, options.verify)
    threads = max(1, min(options.io_threads, len(reads)))
    if threads == 1:
        for r in reads:
            worker(r)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="ckpt-read") as pool:
        for _ in pool.map(worker, reads):
            pass


def _aligned(n: int) -> int:
    """Scratch slices start on a cache line (and so on any element size)."""
    return -(-n // 64) * 64


def as_tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 tensor (a view)."""
    return t.detach().reshape(-1).view(torch.uint8)


def _target_view(entry: TensorEntry, piece: int, box: Box) -> torch.Tensor:
    p = entry.pieces[piece]
    rel = box.relative_to(p.box)
    return local_view(entry.local.detach(), p)[rel.slices()]


class _ReadWorker:
    """Executes one coalesced read: fetch, verify, copy out.

    Whole chunks land straight in their targets (one copy, by ``preadv`` on
    local files). Reads that also need scratch space (partial chunks, as in
    resharding) are served from a mapping of the local file, so the bytes are
    hashed and copied out of the page cache without a read copy or fresh,
    page-faulting buffers; other backends read into a per-thread scratch arena
    that is reused from one read to the next.
    """

    def __init__(self, storage: Storage, manifest: Manifest, targets: dict[str, TensorEntry], verify: bool):
        self.storage, self.manifest, self.targets, self.verify = storage, manifest, targets, verify
        self.mapped = isinstance(storage, Storage) and storage.local
        self._local = threading.local()

    def __call__(self, read: Read) -> None:
        if self.mapped and any(seg.direct is None for seg in read.segments):
            self._from_mapping(read)
            return
        bufs: list[torch.Tensor] = []
        scratch = self._scratch(sum(_aligned(seg.stop - seg.start) for seg in read.segments if seg.direct is None))
        at = 0
        for seg in read.segments:
            if seg.direct is not None:
                bufs.append(_target_view(self.targets[seg.direct.key], seg.direct.piece, seg.direct.chunk.box))
            else:
                bufs.append(scratch[at : at + seg.stop - seg.start])
                at += _aligned(seg.stop - seg.start)
        self.storage.read_into_many(read.object, read.start, [as_bytes(b) for b in bufs])
        for seg, buf in zip(read.segments, bufs):
            if self.verify:
                self._verify(read.object, seg, as_bytes(buf))
            for n in seg.needs:
                self._copy_out(seg, buf, n)

    def _from_mapping(self, read: Read) -> None:
        view = self.storage.map_range(read.object, read.start, read.stop)
        assert view is not None
        whole = torch.frombuffer(view, dtype=torch.uint8) if len(view) else torch.empty(0, dtype=torch.uint8)
        for seg in read.segments:
            lo, hi = seg.start - read.start, seg.stop - read.start
            if self.verify:
                self._verify(read.object, seg, view[lo:hi])
            buf = whole[lo:hi]
            if seg.direct is not None:
                n = seg.direct
                as_tensor_bytes(_target_view(self.targets[n.key], n.piece, n.chunk.box)).copy_(buf)
            for n in seg.needs:
                self._copy_out(seg, buf, n)

    def _scratch(self, nbytes: int) -> torch.Tensor:
        """This thread's scratch arena, grown to ``nbytes`` and reused across reads."""
        arena = getattr(self._local, "arena", None)
        if arena is None or arena.numel() < nbytes:
            arena = self._local.arena = torch.empty(nbytes, dtype=torch.uint8)
        return arena

    def _verify(self, obj: str, seg: Segment, buf: memoryview) -> None:
        B = self.manifest.block_bytes
        for (_, b), chunk in seg.blocks.items():
            lo = chunk.offset + b * B
            hi = min(lo + B, chunk.offset + chunk.length)
            if checksum(buf[lo - seg.start : hi - seg.start]) != chunk.checksums[b]:
                key = next((k for k, r in self.manifest.tensors.items() if chunk in r.chunks), "?")
                raise CorruptChunkError(
                    f"{self.storage.describe(obj)}: bytes [{lo}, {hi}) of {key} chunk {chunk.box} "
                    f"do not match their checksum (block {b})"
                )

    def _copy_out(self, seg: Segment, buf: torch.Tensor, n: Need) -> None:
        rec: TensorRecord = self.manifest.tensors[n.key]
        raw = buf[n.byte_start - seg.start : n.byte_stop - seg.start]
        if raw.data_ptr() % n.itemsize:
            raw = raw.clone()
        src = raw.view(rec.dtype)
        sizes, strides, offset = span_view(n.chunk.box, n.span)
        src = torch.as_strided(src, sizes, strides, src.storage_offset() + offset)
        _target_view(self.targets[n.key], n.piece, n.span.box).copy_(src)
