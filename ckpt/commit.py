"""The commit protocol: rank indexes, failure reports, the manifest write, and waiting for it.

It needs nothing but storage, so the same code runs in a trainer, in a daemon,
or split between them:

1. every rank writes its data object (durable), then ``_staging/<save_id>/rank-NNNNN.json``
   listing its chunks (:func:`write_rank_index`); a rank that fails writes
   ``rank-NNNNN.error`` instead (:func:`report_failure`);
2. the committer (rank 0) waits for every rank's index, writes ``manifest.json``
   in one atomic step, then removes the staging files and any objects of the
   checkpoint it replaced (:func:`commit`);
3. the other ranks wait until their index is gone (committed) or ``ABORT`` appears
   (:func:`wait_committed`).

Until step 2 the location holds no manifest (or the previous one), so a crash at
any point leaves nothing loadable that was not fully written. docs/FORMAT.md
("Commit protocol") is the normative description.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from . import structure
from .errors import SaveAbortedError
from .format import MANIFEST, STAGING_DIR, Chunk, Manifest, TensorRecord, dtype_from_name, dtype_name
from .framing import ChunkSpec
from .storage import Storage, open_storage
from .values import decode


def staging_name(save_id: str, name: str) -> str:
    return f"{STAGING_DIR}/{save_id}/{name}"


def rank_index_name(save_id: str, rank: int) -> str:
    return staging_name(save_id, f"rank-{rank:05d}.json")


def write_rank_index(storage: Storage, save_id: str, rank: int, index: dict[str, Any]) -> None:
    """The durability marker: written only after the rank's objects are durable."""
    storage.put_atomic(rank_index_name(save_id, rank), json.dumps(index).encode())


def add_records(index: dict[str, Any], rel: str, specs: list[ChunkSpec], records: list[Chunk]) -> None:
    """Enter one written object and its chunks into a rank index."""
    index["objects"][rel] = max((r.offset + r.stored for r in records), default=0)
    for spec, rec in zip(specs, records):
        index["chunks"].setdefault(spec.key, []).append(rec.to_json())


def report_failure(storage: Storage, save_id: str, rank: int, error: BaseException) -> None:
    """Tell the committer this rank will not finish (best effort). A failing rank 0
    is the committer: it aborts the save itself, or the others would wait out their timeout."""
    reason = f"{type(error).__name__}: {error}"
    try:
        storage.put_atomic(staging_name(save_id, f"rank-{rank:05d}.error"), reason.encode())
        if rank == 0:
            storage.put_atomic(staging_name(save_id, "ABORT"), f"rank failure: rank-00000: {reason}".encode())
    except Exception:
        pass


def poll_cap(storage: Storage) -> float:
    """Longest pause between polls of the commit protocol: short on a local disk; on remote
    storage every poll is a request per rank, so back off to a second."""
    return 1.0 if storage.is_remote else 0.05


def commit(storage: Storage, save_id: str, world_size: int, timeout_s: float) -> Manifest:
    """Wait for every rank's index, then write the manifest (the commit point)."""
    names = [f"rank-{r:05d}.json" for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        storage.invalidate()
        present = set(storage.listdir(f"{STAGING_DIR}/{save_id}"))
        errors = sorted(n for n in present if n.endswith(".error"))
        if errors:
            reasons = "; ".join(
                f"{n[:-6]}: {storage.read_bytes(staging_name(save_id, n)).decode(errors='replace')}" for n in errors
            )
            _abort(storage, save_id, f"rank failure: {reasons}")
        missing = [n for n in names if n not in present]
        if not missing:
            break
        if time.monotonic() > deadline:
            waiting = ", ".join(m[:-5] for m in missing)
            _abort(storage, save_id, f"timed out after {timeout_s:.0f}s waiting for {waiting}")
        time.sleep(delay)
        delay = min(delay * 2, poll_cap(storage))

    indexes = [json.loads(storage.read_bytes(staging_name(save_id, n))) for n in names]
    head = indexes[0]
    objects: dict[str, int] = {}
    chunks: dict[str, list[Chunk]] = {}
    refs: dict[str, dict[str, int]] = {}
    for idx in indexes:
        objects.update(idx["objects"])
        for sibling, objs in (idx.get("refs") or {}).items():
            refs.setdefault(sibling, {}).update(objs)
        for key, recs in idx["chunks"].items():
            chunks.setdefault(key, []).extend(Chunk.from_json(r) for r in recs)
    tensors = {
        key: TensorRecord(
            tuple(meta["shape"]),
            dtype_name(dtype_from_name(meta["dtype"])),  # validated: a known name
            sorted(chunks.get(key, []), key=lambda c: c.box.offsets),
            meta.get("layout", ""),
        )
        for key, meta in head["tensors"].items()
    }
    values = {k: decode(v) for k, v in head["values"].items()}
    merged = None
    for idx in indexes:  # ranks may hold different keys; values are rank 0's only
        merged = structure.merge(merged, idx.get("structure"))
    manifest = Manifest(
        save_id=save_id,
        tensors=tensors,
        values=values,
        objects=objects,
        block_bytes=head["block_bytes"],
        step=head.get("step"),
        metrics=decode(head.get("metrics") or {}),
        metadata=decode(head.get("metadata") or {}),
        structure=_structure_of(merged, set(tensors) | set(values)),
        topology=head.get("topology") or {},
        library_version=head.get("library_version", ""),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        refs=refs,
    )
    manifest.validate(storage.describe(MANIFEST))
    previous = _committed_objects(storage)
    storage.put_atomic(MANIFEST, manifest.to_json_bytes())
    replaced = previous - set(objects)
    if replaced:
        replaced -= _referenced_by_siblings(storage, replaced)
    for rel in sorted(replaced):
        storage.delete(rel)
    storage.delete(f"{STAGING_DIR}/{save_id}", recursive=True)
    if not storage.listdir(STAGING_DIR):
        storage.delete(STAGING_DIR, recursive=True)
    return manifest


def _structure_of(merged: Any, keys: set[str]) -> Any:
    """The merged structure without leaves no rank stored; None (readers infer it) when it
    does not account for every key (an offline writer given a structure of other keys)."""
    if merged is None:
        return None
    pruned = structure.prune(merged, keys)
    return pruned if set(structure.leaves(pruned)) == keys else None


def _committed_objects(storage: Storage) -> set[str]:
    if not storage.exists(MANIFEST):
        return set()
    try:
        return set(json.loads(storage.read_bytes(MANIFEST))["objects"])
    except (ValueError, KeyError, TypeError):
        return set()


def _referenced_by_siblings(storage: Storage, objects: set[str]) -> set[str]:
    """Those of ``objects`` (this checkpoint's) that other checkpoints of its run root, or
    saves in flight there, reference: an overwrite must not delete them. All, if unknown."""
    from .refs import live_objects, split_uri  # refs reads manifests; imported only on overwrite

    root, name = split_uri(storage.uri)
    try:
        live = live_objects(open_storage(root, **storage.options))
    except (OSError, ValueError, KeyError, TypeError):
        live = None
    if live is None:
        return set(objects)
    return {rel for rel in objects if f"{name}/{rel}" in live}


def _abort(storage: Storage, save_id: str, reason: str) -> None:
    storage.put_atomic(staging_name(save_id, "ABORT"), reason.encode())
    raise SaveAbortedError(f"{storage.uri}: save {save_id} not committed: {reason}")


def wait_committed(storage: Storage, save_id: str, rank: int, timeout_s: float) -> None:
    """On a non-committing rank: return once the committer has committed."""
    mine = rank_index_name(save_id, rank)
    abort = staging_name(save_id, "ABORT")
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        storage.invalidate()
        if storage.exists(abort):
            reason = storage.read_bytes(abort).decode(errors="replace")
            raise SaveAbortedError(f"{storage.uri}: save {save_id} not committed: {reason}")
        if not storage.exists(mine):
            return
        if time.monotonic() > deadline:
            raise SaveAbortedError(f"{storage.uri}: save {save_id}: no commit within {timeout_s:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, poll_cap(storage))
