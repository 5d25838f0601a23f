"""The commit protocol: rank indexes, failure reports, the manifest write, and waiting for it.

It needs nothing but storage, so the same code runs in a trainer, in a daemon,
or split between them:

1. every rank writes its data object (durable), then ``_staging/<save_id>/rank-NNNNN.json``
   listing its chunks (:func:`write_rank_index`); a rank that fails writes
   ``rank-NNNNN.error`` instead (:func:`report_failure`);
2. the committer (rank 0) waits for every rank's index, then writes ``manifest.json``
   in one step: an exclusive create (only if no manifest is there), or with
   ``overwrite`` a replacing put. That write is the commit point (:func:`commit`).
   It then deletes the objects of the checkpoint it replaced and this save's staging
   files, the rank indexes last but one: their disappearance wakes the other ranks;
3. the other ranks poll their own index (one request per poll); once it is gone they
   learn the outcome from the commit itself, the manifest naming their save, or from
   ``ABORT`` (:func:`wait_committed`), never from the missing file alone.

Until step 2 the location holds no manifest (or the previous one), so a crash at
any point leaves nothing loadable that was not fully written. Nothing after the
commit point fails a committed save: what clean-up cannot delete is logged and
left for ``ckpt gc``. docs/FORMAT.md ("Commit protocol") is the normative description.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from . import structure
from .errors import CheckpointExistsError, ConcurrentSaveError, RankLostError, SaveAbortedError
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
from .liveness import Watch
from .storage import ConditionalPutUnsupportedError, Storage, open_storage
from .values import decode

log = logging.getLogger("ckpt.commit")

ABORT = "ABORT"  # the save will not commit: {"error": type name, "reason": ..., "rank": r or null}
# Errors about the location itself: every rank of the save raises the same type.
_LOCATION_ERRORS: dict[str, type[CheckpointExistsError]] = {
    "CheckpointExistsError": CheckpointExistsError,
    "ConcurrentSaveError": ConcurrentSaveError,
}
LOST = "RankLostError"  # the error type an ABORT names for a rank whose heartbeat went stale


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
    doc = {"rank": rank, "error": type(error).__name__, "message": str(error)}
    try:
        storage.put_atomic(staging_name(save_id, f"rank-{rank:05d}.error"), json.dumps(doc).encode())
        if rank == 0:
            _write_abort(storage, save_id, [doc])
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


def commit(
    storage: Storage, save_id: str, world_size: int, timeout_s: float, committed: Callable[[], None] | None = None
) -> Manifest:
    """Wait for every rank's index, then write the manifest (the commit point).

    Rank 0's index says whether the save may replace a committed checkpoint
    (``overwrite``); without it the manifest is created only if none exists, and
    a save that loses that race raises ConcurrentSaveError on every rank. A rank whose
    index is missing and whose heartbeat went stale (``ckpt.liveness``) aborts the save
    with RankLostError. ``committed`` runs at the commit point, before clean-up (it stops
    the committer's heartbeat, so that none is written after the staging files are gone).
    """
    names = [f"{spread_prefix(r, world_size)}rank-{r:05d}.json" for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    watch = Watch(storage, save_id, world_size)
    delay = 0.001
    while True:
        storage.invalidate()
        present = _listing(storage, save_id)
        if ABORT in present:  # a waiting rank found this committer's heartbeat stale: honour it
            _raise_if_aborted(storage, save_id, staging_name(save_id, ABORT))
        errors = sorted(n for n in present if n.endswith(".error"))
        if errors:
            _abort(storage, save_id, *[_read_error(storage, save_id, n) for n in errors])
        missing = [n for n in names if n not in present]
        if not missing:
            break
        # Only heartbeats the listing shows are read: a rank that never beat is not judged.
        lost = watch.lost(_rank_of(n) for n in missing if f"{n[: -len('.json')]}.alive" in present)
        if lost:
            _abort(storage, save_id, *lost)
        if time.monotonic() > deadline:
            waiting = ", ".join(m[:-5].rsplit("/", 1)[-1] for m in missing[:20])
            waiting += f", ... ({len(missing)})" if len(missing) > 20 else ""
            why = f"timed out after {timeout_s:.0f}s waiting for {waiting}"
            _abort(storage, save_id, {"rank": None, "error": "SaveAbortedError", "message": why})
        time.sleep(delay)
        delay = min(delay * 2, poll_cap(storage))

    head = json.loads(storage.read_bytes(staging_name(save_id, names[0])))
    manifest = assemble(storage, save_id, names)
    manifest.validate(storage.uri_of(MANIFEST))
    data = manifest.to_json_bytes()
    previous = None
    if head.get("overwrite", False):
        previous = _committed_manifest(storage)
        storage.put_atomic(MANIFEST, data)
        if previous is not None:
            log.info("%s: save %s committed, replacing save %s", storage.uri, save_id, previous[0])
    elif not _create_manifest(storage, data):
        other = _committed_manifest(storage)
        reason = f"another save ({other[0] if other else 'unknown'}) committed at this location first"
        _abort(storage, save_id, {"rank": None, "error": "ConcurrentSaveError", "message": reason})
    # Committed. Nothing below may fail the save: what is left undone is litter for `ckpt gc`.
    if committed is not None:
        _best_effort(storage, "stop its heartbeat", committed)
    if previous is not None:
        replaced = previous[1]
        _best_effort(storage, "delete the replaced objects", lambda: _delete_replaced(storage, replaced, manifest))
    _best_effort(storage, "clean up its staging files", lambda: _clean_staging(storage, save_id))
    return manifest


def _delete_replaced(storage: Storage, previous: list[str], manifest: Manifest) -> None:
    """The replaced checkpoint's own objects that the new one does not name, except those
    other checkpoints of the run root (or saves in flight there) still reference."""
    replaced = {o for o in set(previous) - set(manifest.objects) if ".." not in o.split("/")}  # own objects only
    if replaced:
        replaced -= _referenced_by_siblings(storage, replaced)
    for rel in sorted(replaced):
        _best_effort(storage, f"delete {rel} of the replaced save", lambda rel=rel: storage.delete(rel))


def _clean_staging(storage: Storage, save_id: str) -> None:
    """This save's staging files, each by name, the waiting ranks' indexes last (deleting one
    tells its rank to look at the manifest); then the directories only if empty. Never
    ``_staging`` recursively: the job's next save may be staging there already."""
    staging = f"{STAGING_DIR}/{save_id}"
    storage.invalidate()
    present = sorted(_listing(storage, save_id))
    waiting = [n for n in present if _is_rank_index(n)]
    rest = [n for n in present if not _is_rank_index(n) and not n.isdigit()]
    for batch in (rest, waiting):
        # Each on its own: a file that will not go must not keep a waiting rank from its answer.
        _delete_each(batch, lambda name: _best_effort(
            storage, f"delete {staging}/{name}", lambda: storage.delete(staging_name(save_id, name))
        ))
    spreads = sorted({n.split("/", 1)[0] for n in present if "/" in n})
    _delete_each(spreads, lambda spread: storage.remove_empty_dir(f"{staging}/{spread}"))
    storage.remove_empty_dir(staging)
    storage.remove_empty_dir(STAGING_DIR)


def _rank_of(name: str) -> int:
    """``[NN/]rank-NNNNN.json`` -> NNNNN."""
    return int(name.rsplit("rank-", 1)[1].split(".", 1)[0])


def _read_error(storage: Storage, save_id: str, name: str) -> dict[str, Any]:
    """A rank's failure report (JSON; plain text from older writers)."""
    raw = storage.read_bytes(staging_name(save_id, name)).decode(errors="replace")
    rank = int(name.rsplit("/", 1)[-1][len("rank-") : -len(".error")])
    try:
        doc = json.loads(raw)
        return {"rank": rank, "error": str(doc["error"]), "message": str(doc["message"])}
    except (ValueError, KeyError, TypeError):
        return {"rank": rank, "error": "", "message": raw}


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
    values: dict[str, Any] = {}  # key -> encoded value, from the lowest rank holding it
    differ: dict[str, list[int]] = {}  # key -> higher ranks holding another value

    def fold(idx: dict[str, Any]) -> None:
        nonlocal merged
        new = False
        for key, value in (idx.get("values") or {}).items():
            if key not in values:
                values[key], new = value, True
            elif values[key] != value:
                differ.setdefault(key, []).append(int(idx["rank"]))
        if new and "value_structure" in idx:
            merged = structure.merge(merged, idx["value_structure"])
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
    if differ:
        _warn_values_differ(storage, differ)
    clash = sorted(set(values) & set(tensors))
    if clash:  # a tensor on some rank, a value on another: the tensor is saved
        log.warning("%s: key(s) %s are tensors on some ranks and values on others; the values are not saved",
                    storage.uri, ", ".join(map(repr, clash[:10])))
    values = {k: decode(v) for k, v in values.items() if k not in tensors}
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


def _warn_values_differ(storage: Storage, differ: dict[str, list[int]]) -> None:
    """One warning per save naming the values ranks disagree on: the lowest rank's is kept."""
    keys = sorted(differ)
    shown = ", ".join(f"{k!r} (ranks {', '.join(map(str, differ[k][:5]))}{', ...' if len(differ[k]) > 5 else ''})"
                      for k in keys[:10])
    more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
    log.warning(
        "%s: %d value key(s) differ between ranks; the lowest rank's value is saved, the others' are not: %s%s "
        "(a per-rank value, such as an RNG state, needs a key of its own on each rank)",
        storage.uri, len(keys), shown, more,
    )


def _structure_of(merged: Any, keys: set[str]) -> Any:
    """The merged structure without leaves no rank stored; None (readers infer it) when it
    does not account for every key (an offline writer given a structure of other keys)."""
    if merged is None:
        return None
    pruned = structure.prune(merged, keys)
    return pruned if set(structure.leaves(pruned)) == keys else None


def _create_manifest(storage: Storage, data: bytes) -> bool:
    """Create the manifest only if there is none; False if another save's is there.

    A conditional create where the backend has one (local: link(2); S3: If-None-Match).
    Elsewhere (fsspec backends such as memory://) the fallback checks, writes, and reads
    back: it catches a racer that wrote first or right after, but two writes within one
    round trip of each other may both pass; docs/FORMAT.md says so.
    """
    if storage.supports_put_if_absent:
        try:
            return storage.put_if_absent(MANIFEST, data)
        except ConditionalPutUnsupportedError as e:  # an S3-compatible server without If-None-Match
            log.warning("%s; falling back to check-then-write", e)
    storage.invalidate()
    if storage.exists(MANIFEST):
        return False
    storage.put_atomic(MANIFEST, data)
    storage.invalidate()
    return storage.read_bytes(MANIFEST) == data


def _committed_manifest(storage: Storage) -> tuple[str, list[str]] | None:
    """(save_id, objects) of the manifest at the location, if it has a readable one."""
    try:
        doc = json.loads(storage.read_bytes(MANIFEST))
        return str(doc["save_id"]), list(doc["objects"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


_SAVE_ID = re.compile(rb'"save_id"\s*:\s*"([^"\\]*)"')


def committed_save_id(storage: Storage) -> str | None:
    """The save id the location's manifest names (None: no manifest): the commit itself, read
    from the manifest's first bytes (``save_id`` is its third member), in full if need be."""
    try:
        head = storage.read_range(MANIFEST, 0, 512)
    except FileNotFoundError:
        return None
    found = _SAVE_ID.search(head)
    if found is not None:
        return found.group(1).decode()
    whole = _committed_manifest(storage)
    return whole[0] if whole is not None else None


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


def _write_abort(storage: Storage, save_id: str, failures: list[dict[str, Any]]) -> None:
    """ABORT names the first failing rank and why; a location error (the checkpoint
    exists, a racing save won) is raised as that type on every rank."""
    first = next((f for f in failures if f["error"] in _LOCATION_ERRORS), failures[0])
    reason = "; ".join(
        f"rank {f['rank']}: {f['error']}: {f['message']}" if f["rank"] is not None else f["message"] for f in failures
    )
    doc = {"rank": first["rank"], "error": first["error"], "reason": reason}
    storage.put_atomic(staging_name(save_id, ABORT), json.dumps(doc).encode())


def _abort(storage: Storage, save_id: str, *failures: dict[str, Any]) -> None:
    _write_abort(storage, save_id, list(failures))
    _release_waiters(storage, save_id)
    _raise_abort(storage, save_id, storage.read_bytes(staging_name(save_id, ABORT)))


def _raise_abort(storage: Storage, save_id: str, raw: bytes) -> None:
    try:
        doc = json.loads(raw)
        rank, cause, reason = doc.get("rank"), doc.get("error") or None, str(doc["reason"])
    except (ValueError, KeyError, TypeError, AttributeError):  # plain text from an older writer
        rank, cause, reason = None, None, raw.decode(errors="replace")
    message = f"{storage.uri}: save {save_id} not committed: {reason}"
    if cause in _LOCATION_ERRORS:
        raise _LOCATION_ERRORS[cause](message)
    if cause == LOST:
        raise RankLostError(message, rank=rank if isinstance(rank, int) else None, cause=cause)
    raise SaveAbortedError(message, rank=rank if isinstance(rank, int) else None, cause=cause)


def _release_waiters(storage: Storage, save_id: str) -> None:
    """After ``ABORT`` is written: delete the rank indexes, which waiting ranks poll (one request
    per poll); seeing theirs gone, they read ``ABORT``."""
    storage.invalidate()
    waiting = [n for n in _listing(storage, save_id) if _is_rank_index(n)]
    _delete_each(waiting, lambda name: storage.delete(staging_name(save_id, name)))


def _is_rank_index(name: str) -> bool:
    return name.rsplit("/", 1)[-1].startswith("rank-") and name.endswith(".json")


def _delete_each(names: list[str], delete: Callable[[str], None]) -> None:
    """``delete`` each staging file (or spread directory), ``READ_THREADS`` at a time: one at a
    time, a committer of 16K ranks would spend minutes of 20 ms requests before its save returns
    (or, aborting, before the waiting ranks learn why)."""
    stripes = [names[i :: READ_THREADS] for i in range(min(READ_THREADS, len(names)))]  # a task each, not a name
    if len(stripes) <= 1:
        for name in names:
            delete(name)
        return
    with ThreadPoolExecutor(len(stripes), thread_name_prefix="ckpt-commit") as pool:
        list(pool.map(lambda stripe: [delete(name) for name in stripe], stripes))


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
    """On a non-committing rank: return once the save is committed, or raise why not.

    Each poll is one request, for this rank's own index: the committer deletes it after the
    commit and, after writing ``ABORT``, on abort. Its absence only says "look": the outcome
    comes from ``ABORT`` or from the manifest naming this save, never from a missing file
    alone (a racing job's clean-up or a gc can remove it too). ``ABORT`` is also read at the
    first poll (the save may have been aborted before this rank's index appeared). The first
    poll comes after a jittered pause too, so W ranks finishing together do not all read
    ``ABORT`` in the same second. At the timeout a manifest naming this save still counts
    (a committer that died between the commit and its clean-up).

    It also watches the committer's heartbeat (one more request per interval, spaced so that
    all waiters together stay within ``POLL_BUDGET_PER_S`` on object stores): once it is stale
    and the save neither aborted nor committed, this rank writes ``ABORT`` naming rank 0 and
    raises RankLostError."""
    mine = rank_index_name(save_id, rank, world_size)
    abort = staging_name(save_id, ABORT)
    deadline = time.monotonic() + timeout_s
    delays = poll_delays(storage, world_size)
    watch = Watch(storage, save_id, world_size, world_size / POLL_BUDGET_PER_S if storage.is_remote else 0.0)
    first = True
    while True:
        time.sleep(next(delays))
        storage.invalidate()
        if first:
            _raise_if_aborted(storage, save_id, abort)
            first = False
        lost = watch.lost([0]) if rank != 0 else []
        if lost:
            _committer_lost(storage, save_id, abort, lost)
            return
        gone = not storage.exists(mine)
        if gone or time.monotonic() > deadline:
            _raise_if_aborted(storage, save_id, abort)
            found = committed_save_id(storage)
            if found == save_id:
                return
            if gone:
                named = f"the manifest names save {found}" if found else "there is no manifest"
                raise SaveAbortedError(
                    f"{storage.uri}: save {save_id} not committed: its staging index was removed, "
                    f"no ABORT, and {named} (another writer or a gc removed its files)"
                )
            raise SaveAbortedError(f"{storage.uri}: save {save_id}: no commit within {timeout_s:.0f}s")


def _committer_lost(storage: Storage, save_id: str, abort: str, lost: list[dict[str, Any]]) -> None:
    """The committer's heartbeat went stale: return if it committed before it died, else
    abort the save for every rank (``ABORT`` stops a committer that was only stalled too)."""
    storage.invalidate()
    _raise_if_aborted(storage, save_id, abort)
    if committed_save_id(storage) == save_id:
        return
    try:
        _write_abort(storage, save_id, lost)
    except Exception as e:
        log.warning("%s: could not write ABORT for save %s: %s: %s", storage.uri, save_id, type(e).__name__, e)
    if committed_save_id(storage) == save_id:  # it committed after all, just before the ABORT
        return
    _raise_if_aborted(storage, save_id, abort)
    first = lost[0]
    raise RankLostError(
        f"{storage.uri}: save {save_id} not committed: rank {first['rank']}: {LOST}: {first['message']}",
        rank=first["rank"],
        cause=LOST,
    )


def _raise_if_aborted(storage: Storage, save_id: str, abort: str) -> None:
    try:
        raw = storage.read_bytes(abort)
    except FileNotFoundError:
        return
    _raise_abort(storage, save_id, raw)


def _best_effort(storage: Storage, what: str, fn) -> None:
    """Clean-up after the commit point: a failure is logged, never raised."""
    try:
        fn()
    except Exception as e:
        log.warning(
            "%s: committed, but could not %s (left for `ckpt gc`): %s: %s", storage.uri, what, type(e).__name__, e
        )
