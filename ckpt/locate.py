"""Find a committed checkpoint: read its manifest, or resolve a run root to the one ``latest`` names.

No torch: the CLI lists and describes checkpoints through this without importing it.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import CheckpointError, CheckpointNotFoundError
from .format import LATEST, MANIFEST, Manifest, is_contained
from .storage import Storage, open_storage


def read_manifest_bytes(storage: Storage) -> bytes:
    """The manifest's bytes as stored (unparsed, unverified); CheckpointNotFoundError without one."""
    try:
        return storage.read_bytes(MANIFEST)
    except FileNotFoundError:
        hint = " (it holds uncommitted or partial data)" if storage.exists("") else ""
        raise CheckpointNotFoundError(f"{storage.uri}: no committed checkpoint{hint}") from None


def read_manifest(storage: Storage) -> Manifest:
    return Manifest.from_json_bytes(read_manifest_bytes(storage), storage.uri_of(MANIFEST), storage)


def read_latest(storage: Storage) -> dict[str, Any] | None:
    """A run root's ``latest`` marker if it is one ckpt.Manager wrote: ``name`` a path inside the root
    (no ``..``), ``step`` an integer or null. None when there is none, or another
    library's (DeepSpeed's names a tag) or a damaged one: a marker never leads a reader elsewhere."""
    try:
        doc = json.loads(storage.read_bytes(LATEST))
    except (OSError, ValueError, CheckpointError):
        return None
    if not isinstance(doc, dict):
        return None
    name, step = doc.get("name"), doc.get("step")
    if not isinstance(name, str) or not is_contained(name):
        return None
    if step is not None and type(step) is not int:
        return None
    return doc


def open_checkpoint(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Storage, Manifest]:
    """The checkpoint at ``uri``; at a run root (``ckpt.Manager``), the one ``latest`` names.

    A root without a marker is refused with the list of the checkpoints it holds.
    """
    _, storage = resolve(uri, storage_options)
    return storage, read_manifest(storage)


def resolve(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[str, Storage]:
    """Where the checkpoint at ``uri`` is, as a URI and its storage: ``uri`` itself, or at a run root
    the checkpoint its ``latest`` marker names (which may hold no manifest: ``read_manifest`` says so)."""
    storage = open_storage(uri, **(storage_options or {})).confine()
    if storage.exists(MANIFEST) or not storage.exists(""):
        return uri, storage
    if storage.exists(LATEST):
        marker = read_latest(storage)
        if marker is None:  # another library's marker (DeepSpeed's names a tag), or a damaged one
            raise CheckpointNotFoundError(f"{storage.uri}: its {LATEST} marker is not a ckpt run root's")
        child = f"{uri.rstrip('/')}/{marker['name']}"
        return child, open_storage(child, **(storage_options or {})).confine()
    held = sorted(n for n in storage.listdir("") if storage.exists(f"{n}/{MANIFEST}"))
    if held:
        raise CheckpointNotFoundError(
            f"{storage.uri}: a run root without a 'latest' marker; it holds {len(held)} checkpoint(s): "
            + ", ".join(held[:20])
            + (", ..." if len(held) > 20 else "")
            + "; pass one of them"
        )
    return uri, storage
