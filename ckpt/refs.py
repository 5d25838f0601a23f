"""References between the checkpoints of one run root: taking, reading through, and keeping them alive.

An incremental save (``SaveOptions(incremental_from=...)``) names, for each chunk
whose content digest, size and dtype match the base checkpoint's record at the
same key and box, the object that already holds those bytes, as
``../<sibling>/<rel>``: always the checkpoint that physically holds them, so
references never chain through a checkpoint in between. The protocol that keeps
a referenced object from being deleted under a save that relies on it:

* the saving rank writes ``_staging/<save_id>/refs-rNNNNN.json`` (what it is about
  to reference) and only then checks that the base's manifest is still there,
  otherwise it writes every chunk itself (:func:`reuse`);
* garbage collection deletes a checkpoint's manifest first, then reads every
  declaration under the root, then every manifest's ``refs``, and deletes only
  objects named by none of them (:func:`live_objects`).

So either the save sees the base gone, or the collector sees the declaration.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError
from .format import MANIFEST, STAGING_DIR, Chunk, Manifest, TensorRecord, is_checkpoint_name, ref_object, split_ref
from .storage import DelegatingStorage, Storage, open_storage

if TYPE_CHECKING:  # framing imports torch: `ckpt ls` and `ckpt gc` reach this module without it
    from .framing import ChunkSpec

log = logging.getLogger("ckpt.refs")

DECLARATION = "refs-r{rank:05d}.json"
# Smaller chunks are written again rather than referenced: rewriting them costs next to nothing,
# while a reference keeps the whole object that holds them alive.
MIN_REF_BYTES = 4096


def split_uri(uri: str) -> tuple[str, str]:
    """(run root, checkpoint name) of a checkpoint's location."""
    root, _, name = uri.rstrip("/").rpartition("/")
    return root or ".", name


def check_base(uri: str, base: str) -> str:
    """The name of ``base`` if it is another checkpoint under the same run root as ``uri``;
    else ValueError (references never leave the run root)."""
    (root, name), (base_root, base_name) = split_uri(uri), split_uri(base)
    if root != base_root or not is_checkpoint_name(base_name) or base_name == name:
        raise ValueError(
            f"incremental_from={base!r}: must be another checkpoint under the run root of {uri!r} ({root})"
        )
    return base_name


class RefStorage(DelegatingStorage):
    """A checkpoint's storage that also reads the sibling objects its chunks reference."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        # confined like a checkpoint being read: a sibling's objects are regular files too
        self.root = open_storage(split_uri(inner.uri)[0], **inner.options).confine()

    def _at(self, rel: str) -> tuple[Storage, str]:
        ref = split_ref(rel)
        return (self.inner, rel) if ref is None else (self.root, f"{ref[0]}/{ref[1]}")

    def uri_of(self, rel: str) -> str:
        s, r = self._at(rel)
        return s.uri_of(r)

    def local_path(self, rel: str) -> str | None:
        s, r = self._at(rel)
        return s.local_path(r)

    def read_bytes(self, rel: str) -> bytes:
        s, r = self._at(rel)
        return s.read_bytes(r)

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        s, r = self._at(rel)
        return s.read_range(r, start, stop)

    def read_into_many(self, rel: str, start: int, bufs: list[memoryview]) -> None:
        s, r = self._at(rel)
        s.read_into_many(r, start, bufs)

    def map_range(self, rel: str, start: int, stop: int) -> memoryview | None:
        s, r = self._at(rel)
        return s.map_range(r, start, stop)

    def exists(self, rel: str) -> bool:
        s, r = self._at(rel)
        return s.exists(r)

    def size(self, rel: str) -> int:
        s, r = self._at(rel)
        return s.size(r)


def reading(storage: Storage, manifest: Manifest) -> Storage:
    """``storage``, able to read the objects ``manifest`` references, if it references any."""
    return RefStorage(storage) if manifest.refs else storage


def _base_chunks(rec: TensorRecord, spec: ChunkSpec) -> list[Chunk]:
    """The base's chunks at exactly ``spec``'s box (a tensor stored by rule reads only the object
    indexes that hold them)."""
    return [c for c in rec.chunks_in(spec.box) if c.box == spec.box]


def reuse(
    storage: Storage, save_id: str, rank: int, base_uri: str, specs: list[ChunkSpec], digests: list[str | None]
) -> tuple[dict[int, Chunk], dict[str, dict[str, int]]]:
    """Records, by position in ``specs``, of chunks the base already stores with the same
    digest, size and dtype, re-pointed from this checkpoint; and the referenced objects
    (sibling -> {rel: size}). Declared in staging first; nothing if the base is gone."""
    own = split_uri(storage.uri)[1]
    base_name = check_base(storage.uri, base_uri)
    base_storage = open_storage(base_uri, **storage.options)
    try:
        raw = base_storage.read_bytes(MANIFEST)
        base = Manifest.from_json_bytes(raw, base_storage.uri_of(MANIFEST), base_storage)
        found, held = _matches(base, base_name, own, specs, digests)  # may read the base's object indexes
    except (FileNotFoundError, CheckpointError) as e:
        log.warning("%s: incremental base not readable, writing every chunk (%s)", base_uri, e)
        return {}, {}
    if not found:
        return {}, {}
    declaration = {"refs": {s: sorted(objs) for s, objs in held.items()}}
    storage.put_atomic(f"{STAGING_DIR}/{save_id}/{DECLARATION.format(rank=rank)}", json.dumps(declaration).encode())
    base_storage.invalidate()
    try:
        still = base_storage.read_bytes(MANIFEST) == raw
    except FileNotFoundError:
        still = False
    if not still:
        log.warning("%s: incremental base deleted during the save, writing every chunk", base_uri)
        return {}, {}
    return found, held


def _matches(
    base: Manifest, base_name: str, own: str, specs: list[ChunkSpec], digests: list[str | None]
) -> tuple[dict[int, Chunk], dict[str, dict[str, int]]]:
    """Base records equal to each spec's chunk (digest, size, dtype, same key and box), re-pointed
    from a sibling of the base; and the objects they name (sibling -> {rel: size})."""
    found: dict[int, Chunk] = {}
    held: dict[str, dict[str, int]] = {}
    for i, (spec, digest) in enumerate(zip(specs, digests)):
        rec = base.tensors.get(spec.key)
        if digest is None or rec is None or rec.dtype != spec.dtype or spec.nbytes < MIN_REF_BYTES:
            continue
        for c in _base_chunks(rec, spec):
            if c.digest != digest or c.length != spec.nbytes:
                continue
            ref = split_ref(c.object)
            sibling, rel = (base_name, c.object) if ref is None else ref
            size = base.object_size(c.object)
            if sibling == own or size is None:
                continue
            found[i] = dataclasses.replace(c, object=ref_object(sibling, rel))
            held.setdefault(sibling, {})[rel] = size
            break
    return found, held


def live_objects(root: Storage, excluding: frozenset[str] = frozenset()) -> set[str] | None:
    """Every object (``<checkpoint>/<rel>``) under ``root`` that a manifest or an in-flight
    save's declaration references; None if some manifest's ``refs`` or a declaration cannot
    be read (nothing is then known to be free). A manifest that is not JSON at all loads
    nowhere and references nothing. Declarations are read before manifests: a save that commits
    meanwhile is seen in one or the other. ``excluding``: checkpoints whose manifests do not
    count (a dry run's view of what deleting them would leave)."""
    root = root.confine()  # manifests and declarations are read as a loader would: never a FIFO or a link
    root.invalidate()
    names = [n for n in root.listdir("") if is_checkpoint_name(n)]
    live: set[str] = set()
    for n in names:
        for save in _listdir(root, f"{n}/{STAGING_DIR}"):
            for f in _listdir(root, f"{n}/{STAGING_DIR}/{save}"):
                if f.startswith("refs-r") and f.endswith(".json"):
                    try:
                        doc = json.loads(root.read_bytes(f"{n}/{STAGING_DIR}/{save}/{f}"))
                    except FileNotFoundError:
                        continue  # committed meanwhile: its manifest is read below
                    except (ValueError, OSError, CheckpointError):
                        return None
                    if not _add_refs(live, doc.get("refs") if isinstance(doc, dict) else None):
                        return None
    for n in names:
        if n in excluding:
            continue
        try:
            doc = json.loads(root.read_bytes(f"{n}/{MANIFEST}"))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, CheckpointError):
            continue  # none, or not a regular file (confined storage): nothing loads it
        except ValueError:
            continue  # not JSON at all: nothing can load it, so it references nothing
        if not isinstance(doc, dict):
            continue
        if not _add_refs(live, doc.get("refs") or {}):
            return None
    return live


def _add_refs(live: set[str], refs: Any) -> bool:
    """Add ``refs`` (sibling -> its objects) to ``live``; False if it is not that shape."""
    if not isinstance(refs, dict) or not all(isinstance(objs, (dict, list)) for objs in refs.values()):
        return False
    if not all(isinstance(r, str) for objs in refs.values() for r in objs):
        return False
    live.update(f"{s}/{r}" for s, objs in refs.items() for r in objs)
    return True


def _listdir(storage: Storage, rel: str) -> list[str]:
    try:
        return storage.listdir(rel)
    except (FileNotFoundError, NotADirectoryError):
        return []
