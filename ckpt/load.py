"""``ckpt.load``: match the caller's state dict to the manifest, read only the bytes
each local shard needs, verify them, and copy them in place."""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .describe import LeafRef, TensorEntry, flatten
from .errors import CheckpointNotFoundError, CorruptChunkError, StateDictMismatchError
from .fetch import Fetcher, target_view
from .format import MANIFEST, Manifest
from .ramtier import RamTierStorage
from .readplan import Need, ReadSettings, intersect_chunks, plan_reads
from .storage import Storage, open_storage

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
    A checkpoint in another format (``ckpt.interop``: DCP, DeepSpeed, Megatron
    ``torch_dist``, ByteCheckpoint, safetensors, ``torch.save``) is read in place
    the same way, and its ``SourceInfo`` (step, metadata) is returned.
    """
    options = dataclasses.replace(options or LoadOptions())  # the caller's options stay as they were
    if strict is not None:
        options.strict = strict
    if allow_dtype_cast is not None:
        options.allow_dtype_cast = allow_dtype_cast
    storage: Storage = open_storage(uri, **options.storage_options)
    try:
        manifest = read_manifest(storage)
    except CheckpointNotFoundError:
        from .interop.load_source import load_foreign  # DCP, DeepSpeed, Megatron, HF... read in place

        info = load_foreign(state_dict, uri, options)
        if info is None:
            raise
        return info  # type: ignore[return-value]
    if options.daemon:
        storage = _with_ram_tier(storage, manifest, options.daemon)
    tensors, values, refs = flatten(state_dict)
    _check_match(manifest, tensors, values, refs, options)
    read_tensors(storage, manifest, {k: e for k, e in tensors.items() if k in manifest.tensors}, options)
    for key in values:
        if key in manifest.values:
            _assign(refs[key], manifest.values[key])
    return manifest


def _with_ram_tier(storage: Storage, manifest: Manifest, daemon: str) -> Storage:
    """Serve objects from the daemon's RAM copy when it is a copy of this very save."""
    from .client import ram_tier_lookup

    found = ram_tier_lookup(daemon, storage.uri)
    if found is None:
        return storage
    save_id, directory, objects = found
    if save_id != manifest.save_id:
        log.info("%s: RAM copy is of save %s, storage has %s; reading storage", storage.uri, save_id, manifest.save_id)
        return storage
    return RamTierStorage(storage, directory, objects & set(manifest.objects))


def _check_match(
    manifest: Manifest,
    tensors: dict[str, TensorEntry],
    values: dict[str, Any],
    refs: dict[str, LeafRef],
    options: LoadOptions,
):
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
        if key in manifest.values and isinstance(refs[key].container, tuple):
            problems.append(f"{key}: a value inside a tuple cannot be assigned in place (use a list)")
        if key in manifest.tensors:
            problems.append(f"{key}: the checkpoint holds a tensor here, not a value")
        elif key not in manifest.values and options.strict:
            problems.append(f"{key}: missing from the checkpoint")
    if options.strict:
        unexpected = sorted((set(manifest.tensors) | set(manifest.values)) - set(tensors) - set(values))
        problems.extend(f"{key}: in the checkpoint but not in the state dict" for key in unexpected)
    if problems:
        raise StateDictMismatchError(problems)


def _assign(ref: LeafRef, value: Any) -> None:
    old = ref.container[ref.key]
    ref.container[ref.key] = tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value


def read_tensors(storage: Storage, manifest: Manifest, targets: dict[str, TensorEntry], options: LoadOptions) -> None:
    """Fill each target's pieces from the stored chunks that intersect them."""
    needs: list[Need] = []
    for key, entry in targets.items():
        rec = manifest.tensors[key]
        size = rec.dtype.itemsize
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
        return target_view(entry, n.piece, n.chunk.box).is_contiguous()

    reads = plan_reads(needs, settings, direct_ok)
    worker = Fetcher(storage, manifest, targets, options.verify)
    threads = max(1, min(options.io_threads, len(reads)))
    if threads == 1:
        for r in reads:
            worker(r)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="ckpt-read") as pool:
        for _ in pool.map(worker, reads):
            pass
