"""The checkpoints under a root: what each is, and garbage collection.

A child of the root is a checkpoint if it holds ``manifest.json`` (complete),
or ``data/`` / ``_staging/`` without one (incomplete: a save that never
committed). A manifest that cannot be read marks it *damaged*: it is listed
but never deleted, since it may be a newer format this version cannot read.
A deleted checkpoint whose objects later checkpoints still reference
(incremental saves, :mod:`ckpt.refs`) keeps just those, marked *retired*.
Which checkpoints go is decided by :mod:`ckpt.retention` (shared with the
training-loop manager); this module only finds and deletes (:func:`collect`).
"""

from __future__ import annotations

import json
import math
import numbers
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError
from .format import DATA_DIR, MANIFEST, STAGING_DIR
from .locate import read_latest, read_manifest
from .options import RetentionPolicy, StrEnum
from .refs import live_objects
from .retention import CheckpointInfo, select_deletions
from .storage import Storage, open_storage

if TYPE_CHECKING:
    from .storage import FsspecStorage, LocalStorage


class EntryStatus(StrEnum):
    """What a child of the root is."""

    COMPLETE = "complete"  # committed: manifest.json is there and reads
    INCOMPLETE = "incomplete"  # data or staging files without a manifest: a save that never committed
    DAMAGED = "damaged"  # a manifest that does not read (perhaps a newer format): listed, never deleted
    RETIRED = "retired"  # deleted, but holds objects that later checkpoints reference


RETIRED_MARKER = "retired.json"  # in a deleted checkpoint that keeps referenced objects


STALE_UPLOAD_S = 24 * 3600.0  # no save takes this long: an upload this old lost its writer


@dataclass
class Entry:
    """One checkpoint under a root."""

    name: str
    uri: str
    status: EntryStatus
    step: int | None = None
    size: int = 0  # bytes stored in its own location (objects and manifest)
    created: float | None = None  # seconds since the epoch
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    latest: bool = False  # named by the root's ``latest`` marker (written by ckpt.Manager)
    shared: int = 0  # bytes of earlier checkpoints' objects it references (incremental saves)

    def info(self) -> CheckpointInfo:
        """The facts retention decides on."""
        numbers = tuple(sorted((k, float(v)) for k, v in self.metrics.items() if _finite_number(v)))
        return CheckpointInfo(self.name, self.step, self.status is EntryStatus.COMPLETE, self.created, numbers)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["created"] = _iso(self.created)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        """The entry ``to_json`` wrote (a listing sent to other ranks)."""
        return cls(**{**d, "status": EntryStatus(d["status"]), "created": _parse_time(d["created"] or "")})


def _finite_number(v: Any) -> bool:
    """Whether a stored metric can rank checkpoints (a version 2 metric may be any value)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def child_uri(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def step_from_name(name: str) -> int | None:
    """``step-000100`` -> 100: the trailing number, for checkpoints without a manifest."""
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else None


def entry_at(uri: str, name: str, storage_options: dict[str, Any] | None = None) -> Entry | None:
    """What is at ``uri``, or None if it is not a checkpoint at all. A checkpoint that cannot be
    examined (unreadable, deleted meanwhile, hostile) is a damaged entry, never an error, so one
    bad checkpoint does not break listing, gc or restoring the others."""
    try:
        return _entry_at(uri, name, storage_options)
    except (CheckpointError, OSError) as e:
        return Entry(name, uri, EntryStatus.DAMAGED, step_from_name(name), error=f"{type(e).__name__}: {e}")


def _entry_at(uri: str, name: str, storage_options: dict[str, Any] | None) -> Entry | None:
    storage = open_storage(uri, **(storage_options or {})).confine()
    storage.invalidate()
    names = set(storage.listdir(""))
    if MANIFEST in names:
        try:
            m = read_manifest(storage)
        except CheckpointError as e:
            size, mtime, _ = _contents(storage)
            return Entry(name, uri, EntryStatus.DAMAGED, step_from_name(name), size, mtime, error=str(e))
        size = sum(m.objects.values()) + storage.size(MANIFEST)
        step = m.step if m.step is not None else step_from_name(name)
        created = _parse_time(m.created)
        return Entry(name, uri, EntryStatus.COMPLETE, step, size, created, dict(m.metrics), shared=m.shared_bytes)
    if RETIRED_MARKER in names:
        size, mtime, _ = _contents(storage)
        return Entry(name, uri, EntryStatus.RETIRED, step_from_name(name), size, mtime)
    if DATA_DIR in names or STAGING_DIR in names:
        size, mtime, files = _contents(storage)
        if files:  # some object stores keep empty "directories" after their objects are deleted
            return Entry(name, uri, EntryStatus.INCOMPLETE, step_from_name(name), size, mtime)
    return None


def scan(root: str, storage_options: dict[str, Any] | None = None) -> list[Entry]:
    """Checkpoints directly under ``root`` (and ``root`` itself if it is one), oldest first."""
    storage = open_storage(root, **(storage_options or {})).confine()
    storage.invalidate()
    if not storage.is_dir(""):
        raise FileNotFoundError(f"{root}: no such directory")
    entries = []
    own = entry_at(root, ".", storage_options)
    if own is not None:
        entries.append(own)
    latest = latest_name(storage)
    for name in storage.listdir(""):
        if name.startswith((".", "_")) or name == DATA_DIR or not storage.is_dir(name):
            continue
        e = entry_at(child_uri(root, name), name, storage_options)
        if e is not None:
            e.latest = name == latest
            entries.append(e)
    entries.sort(key=lambda e: (e.step if e.step is not None else -1, e.created or 0.0, e.name))
    return entries


def plan_gc(
    entries: list[Entry],
    policy: RetentionPolicy,
    now: float | None = None,
    in_flight: frozenset[str] = frozenset(),
) -> list[Entry]:
    """Entries to delete: incomplete ones older than the newest complete checkpoint,
    and complete ones ``policy`` drops. Never the root itself, a damaged one, the
    newest complete checkpoint, the one the ``latest`` marker names, or a save in flight."""
    candidates = [e for e in entries if e.name != "." and e.status in (EntryStatus.COMPLETE, EntryStatus.INCOMPLETE)]
    infos = [e.info() for e in candidates]
    doomed = set(select_deletions(infos, policy, now if now is not None else time.time(), in_flight))
    # The marker's checkpoint survives, but still counts towards the rules (keep_last, ...).
    return [e for e in candidates if e.name in doomed and not e.latest]


@dataclass(frozen=True)
class Upload:
    """An unfinished multipart upload under a root (object stores only)."""

    key: str  # relative to the root
    upload_id: str
    started: float | None  # seconds since the epoch

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "upload_id": self.upload_id, "started": _iso(self.started)}


def open_uploads(root: str, storage_options: dict[str, Any] | None = None) -> list[Upload]:
    storage = open_storage(root, **(storage_options or {}))
    return [Upload(k, u, t) for k, u, t in storage.open_uploads()]


def stale_uploads(
    uploads: list[Upload], doomed: list[Entry], now: float, max_age_s: float = STALE_UPLOAD_S
) -> list[Upload]:
    """Uploads nobody will finish: those inside a checkpoint being deleted, and any that
    started more than ``max_age_s`` ago (a save in flight has a recent one). Their parts
    are stored and billed but belong to no object until aborted."""
    gone = tuple(f"{e.name}/" for e in doomed if e.name != ".")

    def stale(u: Upload) -> bool:
        if gone and u.key.startswith(gone):
            return True
        return u.started is not None and now - u.started > max_age_s

    return [u for u in uploads if stale(u)]


def abort_upload(root: str, upload: Upload, storage_options: dict[str, Any] | None = None) -> None:
    open_storage(root, **(storage_options or {})).abort_upload(upload.key, upload.upload_id)


def collect(root: str, doomed: list[Entry], storage_options: dict[str, Any] | None = None) -> list[Entry]:
    """Delete the ``doomed`` checkpoints under ``root``, except the objects that a remaining
    checkpoint or a save in flight references (those stay, the checkpoint *retired*); and
    free what retired checkpoints keep that nothing references any more. Returns the
    entries that were retired rather than removed.

    Order (:mod:`ckpt.refs`): every doomed manifest goes first (nothing loads them, and a
    save that would reference them sees it), then the references are read (in-flight
    declarations, then manifests), then objects are deleted. An interrupted run leaves
    retired or incomplete checkpoints, which the next run finishes."""
    opts = storage_options or {}
    for e in doomed:
        if e.status is EntryStatus.COMPLETE:
            storage = open_storage(e.uri, **opts)
            storage.put_atomic(RETIRED_MARKER, json.dumps({"retired": time.time()}).encode())
            storage.delete(MANIFEST)
    root_storage = open_storage(root, **opts).confine()  # a FIFO as a manifest must not hang gc
    live = live_objects(root_storage)
    doomed_names = {e.name for e in doomed}
    retired = [e for e in scan(root, opts) if e.status is EntryStatus.RETIRED and e.name not in doomed_names]
    kept = []
    for e in [*doomed, *retired]:
        if _sweep(open_storage(e.uri, **opts), e.name, live):
            kept.append(e)
    return kept


def would_retire(root: str, doomed: list[Entry], storage_options: dict[str, Any] | None = None) -> set[str]:
    """Names of the ``doomed`` checkpoints that :func:`collect` would retire (keep objects of)
    rather than remove, as things stand: what a dry run reports."""
    names = frozenset(e.name for e in doomed)
    live = live_objects(open_storage(root, **(storage_options or {})), excluding=names)
    if live is None:
        return set(names)
    return {n for n in names if any(ref.startswith(f"{n}/") for ref in live)}


def _sweep(storage: FsspecStorage | LocalStorage, name: str, live: set[str] | None) -> bool:
    """Delete the files of a checkpoint that has no manifest any more, keeping the objects
    named in ``live`` (all of them if ``live`` is None: unknown); True if some are kept."""
    storage.invalidate()
    try:
        found = storage.fs.find(storage.root)
    except (FileNotFoundError, OSError):
        found = []
    files = [f[len(storage.fs._strip_protocol(storage.root).rstrip("/")) + 1 :] for f in found]
    keep = {f for f in files if live is None or f"{name}/{f}" in live}
    if not keep:
        storage.delete("", recursive=True)
        return False
    if RETIRED_MARKER not in files:
        storage.put_atomic(RETIRED_MARKER, json.dumps({"retired": time.time()}).encode())
    for f in sorted(set(files) - keep - {RETIRED_MARKER, MANIFEST}):
        storage.delete(f)
    return True


def delete(entry: Entry, storage_options: dict[str, Any] | None = None) -> None:
    """Remove one checkpoint, keeping the objects that other checkpoints of its parent
    directory (its run root) reference: :func:`collect` of just this one."""
    collect(entry.uri.rstrip("/").rpartition("/")[0] or ".", [entry], storage_options)


def latest_name(storage: Storage) -> str | None:
    """The checkpoint the root's ``latest`` marker names, if there is a readable one."""
    marker = read_latest(storage)
    return None if marker is None else marker["name"]


def _contents(storage: FsspecStorage | LocalStorage) -> tuple[int, float | None, int]:
    """(total bytes, newest modification time, number of files) under a checkpoint."""
    try:
        found = storage.fs.find(storage.root, detail=True)
    except (FileNotFoundError, OSError):
        return 0, None, 0
    files = [i for i in found.values() if i.get("type", "file") == "file"]
    times = [t for t in (file_mtime(i) for i in files) if t is not None]
    return sum(int(i.get("size") or 0) for i in files), (max(times) if times else None), len(files)


def file_mtime(info: dict[str, Any]) -> float | None:
    for k in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(k)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, str):
            t = _parse_time(v)
            if t is not None:
                return t
    return None


def _parse_time(s: str) -> float | None:
    try:
        return datetime.fromisoformat(s).timestamp() if s else None
    except ValueError:
        return None


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds") if t is not None else None
