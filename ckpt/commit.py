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
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from . import structure
from .errors import SaveAbortedError
from .format import (
    MANIFEST,
    STAGING_DIR,
    Chunk,
    LazyChunks,
    Manifest,
    Mesh,
    Rule,
    TensorRecord,
    dtype_from_name,
    dtype_name,
    index_name,
    spread_prefix,
)
from .framing import ChunkSpec
from .indexes import digest, encode_index
from .storage import Storage, open_storage
from .values import decode


def staging_name(save_id: str, name: str) -> str:
    return f"{STAGING_DIR}/{save_id}/{name}"


def rank_index_name(save_id: str, rank: int, world: int = 1) -> str:
    """Spread over 64 prefixes past 64 ranks, like data objects (``format.spread_prefix``)."""
    return staging_name(save_id, f"{spread_prefix(rank, world)}rank-{rank:05d}.json")


def write_rank_index(storage: Storage, save_id: str, rank: int, index: dict[str, Any], world: int = 1) -> None:
    """The durability marker: written only after the rank's objects are durable."""
    storage.put_atomic(rank_index_name(save_id, rank, world), json.dumps(index).encode())


def add_records(
    index: dict[str, Any], rel: str, specs: list[ChunkSpec], records: list[Chunk], index_keys: set[str] = frozenset()
) -> None:
    """Enter one written object and its chunks into a rank index; the records of ``index_keys``
    (rule tensors) are kept aside for the object's own index (``write_object_index``)."""
    index["objects"][rel] = max((r.offset + r.stored for r in records), default=0)
    for spec, rec in zip(specs, records):
        into = index.setdefault("indexed", {}) if spec.key in index_keys else index["chunks"]
        into.setdefault(spec.key, []).append(rec.to_json())
        index["bytes"] = index.get("bytes", 0) + rec.length


def write_object_index(storage: Storage, save_id: str, rel: str, index: dict[str, Any]) -> None:
    """Write the chunk records kept aside by ``add_records`` as ``rel``'s object index, and
    enter its size and digest into the rank index (the manifest copies them)."""
    raw = encode_index(save_id, rel, index.pop("indexed", {}))
    name = index_name(rel)
    storage.put_atomic(name, raw)
    index["objects"][name] = len(raw)
    index.setdefault("indexes", {})[rel] = {"index": name, "digest": digest(raw)}


def report_failure(storage: Storage, save_id: str, rank: int, error: BaseException) -> None:
    """Tell the committer this rank will not finish (best effort). A failing rank 0
    is the committer: it aborts the save itself, or the others would wait out their timeout."""
    reason = f"{type(error).__name__}: {error}"
    try:
        storage.put_atomic(staging_name(save_id, f"rank-{rank:05d}.error"), reason.encode())
        if rank == 0:
            storage.put_atomic(staging_name(save_id, "ABORT"), f"rank failure: rank-00000: {reason}".encode())
            _release_waiters(storage, save_id)
    except Exception:
        pass


# Waiting ranks poll at most this many requests per second in all, a quarter of S3's 5,500
# reads per second per prefix: the staging prefix also serves the committer's listings.
POLL_BUDGET_PER_S = 1000.0
READ_THREADS = 64  # the committer's parallel reads (and listings) of rank indexes


def poll_cap(storage: Storage) -> float:
    """Longest pause between polls of the commit protocol: short on a local disk; on remote
    storage every poll is a request per rank, so back off to a second."""
    return 1.0 if storage.is_remote else 0.05


def poll_delays(storage: Storage, world_size: int, rng: random.Random | None = None) -> Iterator[float]:
    """Pauses between one rank's polls: from 1 ms doubling to ``poll_cap``, never shorter than
    what keeps ``world_size`` pollers on remote storage within ``POLL_BUDGET_PER_S``, each
    jittered to 0.5-1.5x (the first drawn from 0-1x) so that ranks finishing together do not
    poll in step."""
    rng = rng or random.Random()
    floor = world_size / POLL_BUDGET_PER_S if storage.is_remote else 0.0
    cap = max(poll_cap(storage), floor)
    delay = 0.001
    first = True
    while True:
        base = max(delay, floor)
        yield base * (rng.random() if first else rng.uniform(0.5, 1.5))
        first = False
        delay = min(delay * 2, cap)


def commit(storage: Storage, save_id: str, world_size: int, timeout_s: float) -> Manifest:
    """Wait for every rank's index, then write the manifest (the commit point)."""
    names = [f"{spread_prefix(r, world_size)}rank-{r:05d}.json" for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        storage.invalidate()
        present = _listing(storage, save_id)
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
            waiting = ", ".join(m[:-5].rsplit("/", 1)[-1] for m in missing[:20])
            waiting += f", ... ({len(missing)})" if len(missing) > 20 else ""
            _abort(storage, save_id, f"timed out after {timeout_s:.0f}s waiting for {waiting}")
        time.sleep(delay)
        delay = min(delay * 2, poll_cap(storage))

    manifest = assemble(storage, save_id, names)
    manifest.validate(storage.describe(MANIFEST))
    previous = _committed_objects(storage)
    storage.put_atomic(MANIFEST, manifest.to_json_bytes())
    replaced = previous - set(manifest.objects)
    if replaced:
        replaced -= _referenced_by_siblings(storage, replaced)
    for rel in sorted(replaced):
        storage.delete(rel)
    storage.delete(f"{STAGING_DIR}/{save_id}", recursive=True)
    if not storage.listdir(STAGING_DIR):
        storage.delete(STAGING_DIR, recursive=True)
    return manifest


def assemble(storage: Storage, save_id: str, names: list[str]) -> Manifest:
    """The manifest from the rank indexes, read ``READ_THREADS`` at a time and folded in as
    they arrive (one index in memory per thread, not all of them)."""
    head = json.loads(storage.read_bytes(staging_name(save_id, names[0])))
    objects: dict[str, int] = {}
    indexes: dict[str, dict[str, str]] = {}
    chunks: dict[str, list[Chunk]] = {}
    refs: dict[str, dict[str, int]] = {}
    written = [0] * len(names)
    merged = None

    def fold(idx: dict[str, Any]) -> None:
        nonlocal merged
        objects.update(idx["objects"])
        indexes.update(idx.get("indexes", {}))
        for sibling, objs in (idx.get("refs") or {}).items():
            refs.setdefault(sibling, {}).update(objs)
        for key, recs in idx["chunks"].items():
            chunks.setdefault(key, []).extend(Chunk.from_json(r) for r in recs)
        written[int(idx["rank"])] = int(idx.get("bytes", 0))
        merged = structure.merge(merged, idx.get("structure"))  # ranks may hold different keys

    fold(head)
    read = lambda n: json.loads(storage.read_bytes(staging_name(save_id, n)))  # noqa: E731
    if len(names) > 1:
        with ThreadPoolExecutor(min(READ_THREADS, len(names) - 1), thread_name_prefix="ckpt-commit") as pool:
            for idx in pool.map(read, names[1:]):
                fold(idx)
    tensors = {}
    for key, meta in head["tensors"].items():
        rule = Rule.from_json(meta["rule"]) if "rule" in meta else None
        tensors[key] = TensorRecord(
            tuple(meta["shape"]),
            dtype_name(dtype_from_name(meta["dtype"])),  # validated: a known name
            LazyChunks(key) if rule else sorted(chunks.get(key, []), key=lambda c: c.box.offsets),
            meta.get("layout", ""),
            rule,
        )
    values = {k: decode(v) for k, v in head["values"].items()}
    return Manifest(
        save_id=save_id,
        tensors=tensors,
        values=values,
        objects=objects,
        block_bytes=head["block_bytes"],
        step=head.get("step"),
        metrics=decode(head.get("metrics") or {}),
        metadata=decode(head.get("metadata") or {}),
        structure=_structure_of(merged, set(tensors) | set(values)),
        topology={**(head.get("topology") or {}), "bytes_written_per_rank": written},
        library_version=head.get("library_version", ""),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        meshes=[Mesh.from_json(m) for m in head.get("meshes", [])],
        rank_objects=head.get("rank_objects", "") if any(t.rule for t in tensors.values()) else "",
        indexes=indexes,
        refs=refs,
    )


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
    _release_waiters(storage, save_id)
    raise SaveAbortedError(f"{storage.uri}: save {save_id} not committed: {reason}")


def _release_waiters(storage: Storage, save_id: str) -> None:
    """After ``ABORT`` is written: delete the rank indexes, which waiting ranks poll (one request
    per poll); seeing theirs gone, they read ``ABORT``."""
    storage.invalidate()
    for name in _listing(storage, save_id):
        if name.rsplit("/", 1)[-1].startswith("rank-") and name.endswith(".json"):
            storage.delete(staging_name(save_id, name))


def _listing(storage: Storage, save_id: str) -> set[str]:
    """Names under the save's staging prefix, and under its spread prefixes (``NN/name``)."""
    top = storage.listdir(f"{STAGING_DIR}/{save_id}")
    found = set(top)
    spread = [d for d in top if len(d) == 2 and d.isdigit()]
    if spread:
        with ThreadPoolExecutor(min(READ_THREADS, len(spread)), thread_name_prefix="ckpt-commit") as pool:
            for d, names in zip(spread, pool.map(lambda d: storage.listdir(f"{STAGING_DIR}/{save_id}/{d}"), spread)):
                found.update(f"{d}/{n}" for n in names)
    return found


def wait_committed(storage: Storage, save_id: str, rank: int, timeout_s: float, world_size: int = 1) -> None:
    """On a non-committing rank: return once the committer has committed.

    Each poll is one request, for this rank's own index: the committer deletes it on commit
    and, after writing ``ABORT``, on abort. ``ABORT`` is also read at the first poll (the save
    may have been aborted before this rank's index appeared) and once the index is gone. The
    first poll comes after a jittered pause too, so W ranks finishing together do not all
    read ``ABORT`` in the same second."""
    mine = rank_index_name(save_id, rank, world_size)
    abort = staging_name(save_id, "ABORT")
    deadline = time.monotonic() + timeout_s
    delays = poll_delays(storage, world_size)
    first = True
    while True:
        time.sleep(next(delays))
        storage.invalidate()
        if first:
            _raise_if_aborted(storage, save_id, abort)
            first = False
        if not storage.exists(mine):
            _raise_if_aborted(storage, save_id, abort)
            return
        if time.monotonic() > deadline:
            raise SaveAbortedError(f"{storage.uri}: save {save_id}: no commit within {timeout_s:.0f}s")


def _raise_if_aborted(storage: Storage, save_id: str, abort: str) -> None:
    try:
        reason = storage.read_bytes(abort).decode(errors="replace")
    except FileNotFoundError:
        return
    raise SaveAbortedError(f"{storage.uri}: save {save_id} not committed: {reason}")
