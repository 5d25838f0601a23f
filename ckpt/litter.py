"""Leftovers inside complete checkpoints: the files no committed save needs, for ``ckpt gc``.

A complete checkpoint may still hold files its manifest does not name: data
objects of a save that failed or was killed while overwriting it (partial
ones too, e.g. after a full disk), objects of the save it replaced whose
deletion failed after the commit, and staging files of saves that aborted,
crashed or committed without finishing their clean-up. None is ever loaded.

A save in flight to the same location (an overwrite) writes such files too,
and its data objects appear before any staging file says whose they are. So a
file counts as litter only when its save aborted (``ABORT`` in its staging
directory) or when it has not been modified for ``min_age_s`` (default one
hour, far beyond the commit timeout once a rank's data is written).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .catalog import Entry, EntryStatus, file_mtime
from .commit import ABORT
from .format import DATA_DIR, STAGING_DIR
from .locate import read_manifest
from .refs import live_objects, split_uri
from .storage import open_storage

if TYPE_CHECKING:
    from .storage import FsspecStorage, LocalStorage

LITTER_AGE_S = 3600.0


@dataclass(frozen=True)
class Litter:
    """One leftover file: its path relative to the root gc runs on, its size, and why it is litter."""

    path: str
    size: int
    why: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def find_litter(entry: Entry, now: float, min_age_s: float = LITTER_AGE_S, storage_options=None) -> list[Litter]:
    """The leftovers inside a complete checkpoint (none for other entries)."""
    if entry.status is not EntryStatus.COMPLETE:
        return []
    storage = open_storage(entry.uri, **(storage_options or {}))
    storage.invalidate()
    keep = set(read_manifest(storage).objects)
    referenced = _referenced(entry.uri, storage_options or {})  # by other checkpoints: not litter
    files = _files(storage, DATA_DIR) + _files(storage, STAGING_DIR)
    aborted = {rel.split("/")[1] for rel, _, _ in files if rel.startswith(f"{STAGING_DIR}/") and rel.endswith(ABORT)}
    prefix = "" if entry.name == "." else f"{entry.name}/"
    found = []
    for rel, size, mtime in files:
        staging = rel.startswith(f"{STAGING_DIR}/")
        if not staging and (rel in keep or referenced is None or rel in referenced):
            continue
        save_id = rel.split("/")[1] if staging else _save_of(rel)
        if save_id in aborted:
            why = "staging file of an aborted save" if staging else "data of an aborted save"
        elif mtime is not None and now - mtime >= min_age_s:
            why = (
                "staging file of an unfinished save"
                if staging
                else "data in no manifest (a failed, killed or replaced save)"
            )
        else:
            continue  # possibly a save in flight
        found.append(Litter(prefix + rel, size, why))
    return found


def remove_litter(root: str, litter: list[Litter], storage_options=None) -> None:
    """Delete the files; the staging directories they leave empty go too."""
    storage = open_storage(root, **(storage_options or {}))
    for item in litter:
        storage.delete(item.path)
    for item in litter:
        parts = item.path.split("/")
        if STAGING_DIR in parts:
            at = parts.index(STAGING_DIR)
            storage.remove_empty_dir("/".join(parts[: at + 2]))
            storage.remove_empty_dir("/".join(parts[: at + 1]))


def _referenced(uri: str, storage_options: dict[str, Any]) -> set[str] | None:
    """This checkpoint's objects that other checkpoints of its run root, or saves in flight
    there, reference (``ckpt.refs``); None when that cannot be known (keep every object)."""
    try:
        root, name = split_uri(uri)
        live = live_objects(open_storage(root, **storage_options))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if live is None:
        return None
    return {ref[len(name) + 1 :] for ref in live if ref.startswith(f"{name}/")}


def _save_of(rel: str) -> str:
    """``data/<save_id>-r00001.safetensors`` (a rank's object) or ``data/<save_id>-00001.safetensors``
    (an offline writer's): the save id."""
    return rel.rsplit("/", 1)[-1].split(".", 1)[0].rsplit("-", 1)[0]


def _files(storage: FsspecStorage | LocalStorage, under: str) -> list[tuple[str, int, float | None]]:
    """(path relative to the checkpoint, size, modification time) of every file under ``under``."""
    base = storage.fs._strip_protocol(storage.path(under)).rstrip("/")
    try:
        found = storage.fs.find(base, detail=True)
    except (FileNotFoundError, OSError):
        return []
    return [
        (f"{under}/{path[len(base) + 1 :]}", int(info.get("size") or 0), file_mtime(info))
        for path, info in sorted(found.items())
        if info.get("type", "file") == "file" and path.startswith(base + "/")
    ]
