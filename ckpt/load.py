"""``ckpt.load``: match the caller's state dict to the manifest, read only the bytes
each local shard needs, verify them, and copy them in place."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from . import agree, readonce, refs, share, structure
from .describe import Flat, LeafRef, TensorEntry, describe_tensor, flatten
from .errors import CheckpointNotFoundError, CorruptChunkError, StateDictMismatchError
from .fetch import Fetcher, check_holds, target_view
from .format import Manifest
from .locate import open_checkpoint
from .options import LoadOptions
from .ramtier import RamTierStorage
from .readplan import Need, ReadSettings, intersect_chunks, plan_reads
from .storage import Storage

log = logging.getLogger("ckpt.load")




@dataclass
class LoadResult(Manifest):
    """What a load read (the manifest: step, metrics, ...) and what it matched.

    missing_keys: in the target but not in the checkpoint (left as they were; non-strict only).
    unexpected_keys: in the checkpoint but not in the target (not loaded).
    filled_keys: created where the target held an empty dict or list (a fresh optimizer's state).
    """

    uri: str = ""
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    filled_keys: list[str] = field(default_factory=list)


def load(
    state_dict: dict,
    uri: str,
    *,
    strict: bool | None = None,
    partial: bool | None = None,
    allow_dtype_cast: bool | None = None,
    options: LoadOptions | None = None,
    process_group: Any = None,
) -> LoadResult:
    """Load a checkpoint into ``state_dict`` in place, whatever its sharding.

    Tensors (plain, DTensor, ``Sharded``) are filled in place; JSON values are
    assigned into their containers; an empty dict or list in the target under which
    the checkpoint has entries (a fresh optimizer's ``state``) is filled with new
    tensors on the target's device. ``uri`` may be a run root: its ``latest`` loads.
    Keys: ``strict`` (default) wants the same keys on both sides; ``partial`` wants
    every target key in the checkpoint and skips the rest; ``strict=False`` takes what
    matches. Under torch.distributed rank 0 alone reads the manifest and broadcasts it (two
    broadcasts), every rank raises if any rank fails (one small collective), and bytes
    several ranks hold (replicas) are read once between them and broadcast
    (``LoadOptions.share_replicas``; one more small gather to agree on it), so every
    rank must call ``load``. Returns the manifest with ``missing_keys`` / ``unexpected_keys``.
    A checkpoint in another format (``ckpt.interop``: DCP, DeepSpeed, Megatron
    ``torch_dist``, ByteCheckpoint, safetensors, ``torch.save``) is read in place
    the same way, and its ``SourceInfo`` (step, metadata) is returned.
    """
    changes = {"strict": strict, "partial": partial, "allow_dtype_cast": allow_dtype_cast}
    options = dataclasses.replace(options or LoadOptions(), **{k: v for k, v in changes.items() if v is not None})
    result, error = None, None
    try:
        result = _load(state_dict, uri, options, process_group)
    except Exception as e:  # every rank raises together, or the others hang at their next collective
        error = e
    agree.raise_together(error, f"load of {uri}", process_group)
    assert result is not None
    return result


@dataclass
class _Matched:
    """A checkpoint matched to the caller's state dict, ready to read."""

    storage: Storage  # where tensors are read from: the RAM tier's copy where it holds this very save
    manifest: Manifest
    flat: Flat
    targets: dict[str, TensorEntry]
    result: LoadResult
    ram_tier: bool


def _load(state_dict: dict, uri: str, options: LoadOptions, group: Any) -> LoadResult:
    matched, units, error = None, None, None
    sharing = options.share_replicas is not False and agree.distributed(group)
    try:
        matched = _match(state_dict, uri, options, group)
        if sharing and isinstance(matched, _Matched):
            units = share.find_units(matched.targets, matched.manifest, group)
    except Exception as e:  # raised after the agreement below, which every rank must join
        error = e
    shared: list[share.Unit] = []
    if sharing:
        m = matched if isinstance(matched, _Matched) else None
        mode = share.rank_mode(options.share_replicas, m.storage.is_remote, m.ram_tier) if m else "never"
        shared = share.agree(units if error is None else None, mode, options, group)
    if error is not None:
        raise error
    if not isinstance(matched, _Matched):
        return matched  # a foreign checkpoint, read in place
    read_tensors(matched.storage, matched.manifest, matched.targets, options, shared)
    for key in matched.flat.values:
        if key in matched.manifest.values:
            _assign(matched.flat.refs[key], matched.manifest.values[key])
    return matched.result


def _match(state_dict: dict, uri: str, options: LoadOptions, group: Any) -> _Matched | LoadResult:
    """Open the checkpoint (its manifest read by one rank of a distributed load and broadcast) and
    match the state dict to it (or read a foreign checkpoint in place)."""
    try:
        if agree.distributed(group) and readonce.can_broadcast(group):
            storage, manifest = readonce.open_checkpoint_once(uri, options.storage_options, group)
        else:
            storage, manifest = open_checkpoint(uri, options.storage_options)
    except CheckpointNotFoundError:
        from .interop.load_source import load_foreign  # DCP, DeepSpeed, Megatron, HF... read in place

        info = load_foreign(state_dict, uri, options)
        if info is None:
            raise
        return info  # type: ignore[return-value]
    flat = flatten(state_dict, check_values=False)
    filled = fill_empty(flat, manifest, options, storage)
    missing, unexpected = _check_match(storage.uri, manifest, flat, filled, options)
    read_from: Storage = storage
    if options.daemon:
        read_from = _with_ram_tier(storage, manifest, options.daemon)
    fields = {f.name: getattr(manifest, f.name) for f in dataclasses.fields(Manifest)}
    result = LoadResult(**fields, uri=storage.uri, missing_keys=missing, unexpected_keys=unexpected, filled_keys=filled)
    targets = {k: e for k, e in flat.tensors.items() if k in manifest.tensors}
    return _Matched(read_from, manifest, flat, targets, result, read_from is not storage)


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


def fill_empty(flat: Flat, manifest: Manifest, options: LoadOptions, storage: Storage | None = None) -> list[str]:
    """Build what the checkpoint holds under each empty dict or list of the target.

    New tensors are plain, on the device of the target's first tensor (CPU if none),
    unless ``options.fill`` gives a (sharded) target for the key. They join
    ``flat.tensors`` to be read with the rest; values are decoded in place. Returns the
    keys created.
    """
    stored = sorted([*manifest.tensors, *manifest.values])
    empty = [
        k for k, v in flat.values.items()
        if isinstance(v, (dict, list)) and not v and k not in manifest.values and k not in manifest.tensors
    ]
    if not empty:
        return []
    tree = manifest.tree()
    first = next(iter(flat.tensors.values()), None)
    device = first.local.device if first is not None else torch.device("cpu")
    created: list[str] = []
    sizes: dict[str, int] = {}

    def leaf(key: str) -> Any:
        created.append(key)
        if key in manifest.values:
            return manifest.values[key]
        rec = manifest.tensors[key]
        target = options.fill(key, rec.shape, rec.dtype) if options.fill else None
        if target is None:
            if storage is not None:  # allocate only what the objects hold, never what a manifest claims
                check_holds(refs.reading(storage, manifest), rec.chunks, sizes)
            target = torch.empty(rec.shape, dtype=rec.dtype, device=device)
        flat.tensors[key] = describe_tensor(key, target)
        return target

    for key in empty:
        if not any(k.startswith(key + ".") for k in stored):
            continue
        node = structure.find(tree, key)
        kinds = ("dict",) if isinstance(flat.values[key], dict) else ("list", "tuple")
        if node is structure.MISSING or structure.kind(node) not in kinds:
            continue  # not the same kind of container: reported as a mismatch
        ref = flat.refs[key]
        ref.container[ref.key] = structure.build(node, leaf, lambda _: True, key)
        del flat.values[key]
    return created


_OPTIMIZER_STATE_KEY = re.compile(r"(?:^|\.)state\.(\d+)\.[^.]+$")


def fill_like_params(optimizer: torch.optim.Optimizer) -> Callable[[str, tuple[int, ...], torch.dtype], Any]:
    """A ``LoadOptions.fill`` for a fresh optimizer's state: ``...state.<i>.<name>`` is created
    like parameter ``i`` (``opt.state_dict()`` numbering), so an FSDP2 / DTensor parameter gets
    a DTensor with its mesh and placements, when the stored tensor has the parameter's shape.
    Anything else (Adam's 0-d ``step``) is a plain tensor."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def fill(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Any:
        found = _OPTIMIZER_STATE_KEY.search(key)
        if found is None or int(found.group(1)) >= len(params):
            return None
        param = params[int(found.group(1))]
        if tuple(param.shape) != tuple(shape):
            return None
        with torch.no_grad():
            return torch.empty_like(param, dtype=dtype, requires_grad=False)

    return fill


def _check_match(
    where: str, manifest: Manifest, flat: Flat, filled: list[str], options: LoadOptions
) -> tuple[list[str], list[str]]:
    """Every problem at once, or the (missing, unexpected) keys the options allow."""
    problems = []
    for key, e in flat.tensors.items():
        rec = manifest.tensors.get(key)
        if rec is None:
            if key in manifest.values:
                problems.append(f"{key}: the checkpoint holds a value here, not a tensor")
            continue
        if tuple(rec.shape) != tuple(e.global_shape):
            problems.append(f"{key}: shape {list(e.global_shape)} here, {list(rec.shape)} in the checkpoint")
        if rec.dtype != e.dtype and not options.allow_dtype_cast:
            problems.append(
                f"{key}: dtype {e.dtype} here, {rec.dtype} in the checkpoint (allow_dtype_cast=True to cast)"
            )
    for key in flat.values:
        if key in manifest.values and isinstance(flat.refs[key].container, tuple):
            problems.append(f"{key}: a value inside a tuple cannot be assigned in place (use a list)")
        if key in manifest.tensors:
            problems.append(f"{key}: the checkpoint holds a tensor here, not a value")
    mismatched = len(problems)
    target = set(flat.tensors) | set(flat.values)
    stored = set(manifest.tensors) | set(manifest.values)
    missing = sorted(target - stored)
    unexpected = sorted(stored - target - set(filled))
    if options.strict:
        problems.extend(f"{key}: missing from the checkpoint" for key in missing)
        if not options.partial:
            problems.extend(f"{key}: in the checkpoint but not in the state dict" for key in unexpected)
    if problems:
        n_missing = len(missing) if options.strict else 0
        n_unexpected = len(unexpected) if options.strict and not options.partial else 0
        parts = [
            f"{n_missing} key(s) missing from the checkpoint" if n_missing else "",
            f"{n_unexpected} unexpected" if n_unexpected else "",
            f"{mismatched} mismatched" if mismatched else "",
        ]
        summary = f"{where}: the state dict does not match the checkpoint: " + ", ".join(p for p in parts if p)
        raise StateDictMismatchError(
            problems,
            summary=summary,
            hint=mismatch_hint(
                manifest, problems[:mismatched], missing[:n_missing], unexpected[:n_unexpected], unexpected
            ),
            missing_keys=missing,
            unexpected_keys=unexpected,
        )
    return missing, unexpected


def mismatch_hint(
    manifest: Manifest, mismatched: list[str], missing: list[str], unexpected: list[str], stored_only: list[str]
) -> str:
    """The likeliest cause of a mismatch, in one line. ``missing`` / ``unexpected``: the keys
    reported as problems; ``stored_only``: every key only the checkpoint has (for renames)."""
    renamed = _renamed_prefix(missing, stored_only)
    if renamed:
        (here, there), n = renamed
        return (
            f"'{here}' in the state dict looks renamed from '{there}' in the checkpoint ({n} keys match after it); "
            "rename the module or remap the keys"
        )
    emptied = sorted(
        {k for k, v in manifest.values.items() if v in ({}, []) and any(m.startswith(k + ".") for m in missing)}
    )
    if emptied:
        return (
            f"the checkpoint's {', '.join(repr(k) for k in emptied)} is empty (saved before the optimizer's first "
            "step?); strict=False keeps the state dict's entries"
        )
    if mismatched and all("allow_dtype_cast" in p for p in mismatched) and not missing and not unexpected:
        return "only dtypes differ; pass allow_dtype_cast=True to cast while loading"
    if mismatched and any(": shape " in p for p in mismatched):
        return "shapes differ: the model is configured differently from the one saved"
    if unexpected and not missing:
        return "the checkpoint holds keys the state dict lacks; partial=True loads what the state dict asks for"
    if missing:
        return (
            "the state dict holds keys the checkpoint lacks (a renamed or added module?); strict=False keeps their "
            "current values and reports them in missing_keys"
        )
    return "the state dict and the checkpoint disagree on what some keys hold"


def _renamed_prefix(missing: list[str], unexpected: list[str]) -> tuple[tuple[str, str], int] | None:
    """The (target prefix, checkpoint prefix) most missing keys share with unexpected ones
    after it, when it explains at least half of the missing keys."""
    if not missing or not unexpected:
        return None
    by_suffix: dict[str, list[str]] = {}
    for u in unexpected:
        parts = u.split(".")
        for i in range(1, len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(".".join(parts[:i]))
    pairs: Counter[tuple[str, str]] = Counter()
    for m in missing:
        parts = m.split(".")
        for i in range(1, len(parts)):
            there = by_suffix.get(".".join(parts[i:]))
            if there and len(there) == 1:
                pairs[(".".join(parts[:i]), there[0])] += 1
                break
    if not pairs:
        return None
    best, n = pairs.most_common(1)[0]
    return (best, n) if 2 * n >= len(missing) else None


def _assign(ref: LeafRef, value: Any) -> None:
    old = ref.container[ref.key]
    ref.container[ref.key] = tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value


def read_tensors(
    storage: Storage,
    manifest: Manifest,
    targets: dict[str, TensorEntry],
    options: LoadOptions,
    shared: list[share.Unit] | None = None,
) -> None:
    """Fill each target's pieces from the stored chunks that intersect them; the targets of ``shared``
    replica groups (``share.agree``) are read once per group and broadcast (``share.run``)."""
    if shared:
        share.run(shared, targets, manifest, lambda part: _read_pieces(storage, manifest, part, options), options)
        held = {k for u in shared for k in u.keys}
        targets = {k: e for k, e in targets.items() if k not in held}
    _read_pieces(storage, manifest, targets, options)


def _read_pieces(storage: Storage, manifest: Manifest, targets: dict[str, TensorEntry], options: LoadOptions) -> None:
    needs: list[Need] = []
    for key, entry in targets.items():
        rec = manifest.tensors[key]
        size = rec.dtype.itemsize
        for i, piece in enumerate(entry.pieces):
            got, covered = intersect_chunks(key, i, piece.box, rec.chunks_in(piece.box), size, options.max_gap_bytes)
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
    worker = Fetcher(refs.reading(storage, manifest), manifest, targets, options.verify)
    threads = max(1, min(options.io_threads, len(reads)))
    if threads == 1:
        for r in reads:
            worker(r)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="ckpt-read") as pool:
        for _ in pool.map(worker, reads):
            pass
