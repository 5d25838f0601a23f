"""Object indexes: the chunk records of rule tensors, written beside each data object and read on demand.

A rank's save writes, after its data object, ``<object stem>.index.json`` holding the chunk
records (the manifest's chunk-record JSON) of its chunks of rule tensors; the manifest's
``indexes`` table names it with its xxh3 digest and ``objects`` with its size. A loading rank
computes from a rule which objects hold the cells it needs (ckpt/rules.py) and fetches only
their indexes, in parallel, each verified (size, digest, every record against the rule) before
use. So what a rank reads at load grows with what it loads, not with the world size.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import xxhash

from .errors import CheckpointFormatError
from .format import Chunk, Manifest, rank_object
from .regions import Box
from .rules import rule_chunks

FORMAT = "ckpt-index"


def encode_index(save_id: str, obj: str, records: dict[str, list[dict[str, Any]]]) -> bytes:
    doc = {"format": FORMAT, "save_id": save_id, "object": obj, "chunks": records}
    return json.dumps(doc, separators=(",", ":")).encode()


def digest(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


class IndexSource:
    """Chunk records of a bound manifest's rule tensors, fetched per object once and verified."""

    def __init__(self, storage: Any, manifest: Manifest, threads: int = 16) -> None:
        self.storage, self.manifest, self.threads = storage, manifest, threads
        self._indexes: dict[str, dict[str, dict[tuple[int, ...], Chunk]]] = {}
        self._lock = threading.Lock()
        self.fetched = 0  # indexes read from storage (benchmarks and tests count them)

    def all_chunks(self, key: str) -> list[Chunk]:
        rec = self.manifest.tensors[key]
        return sorted(self.chunks_in(key, Box.full(rec.shape)), key=lambda c: c.box.offsets)

    def chunks_in(self, key: str, box: Box) -> list[Chunk]:
        """The stored chunks of rule tensor ``key`` that intersect ``box``."""
        rec = self.manifest.tensors[key]
        g, meshes = self.manifest.grid_of(rec)
        assert rec.rule is not None
        wanted = [
            (chunk, rank_object(self.manifest.rank_objects, writer))
            for chunk, _, writer in rule_chunks(key, g, meshes, rec.itemsize, rec.rule.chunk_bytes, box)
        ]
        objects = {obj for _, obj in wanted}
        if not objects.issubset(self._indexes):
            self.prefetch(objects)
        out = []
        for chunk, obj in wanted:
            found = self._indexes[obj].get(key, {}).get(chunk.offsets)
            if found is None or found.box != chunk:
                raise CheckpointFormatError(
                    f"{self.storage.uri_of(self.manifest.indexes[obj]['index'])}: no record of {key} chunk {chunk}"
                )
            out.append(found)
        return out

    def prefetch(self, objects: set[str]) -> None:
        """Read the indexes of ``objects`` not read yet, in parallel."""
        with self._lock:
            missing = sorted(o for o in objects if o not in self._indexes)
        if not missing:
            return
        if len(missing) == 1:
            got = [self._read(missing[0])]
        else:
            with ThreadPoolExecutor(min(self.threads, len(missing)), thread_name_prefix="ckpt-index") as pool:
                got = list(pool.map(self._read, missing))
        with self._lock:
            self._indexes.update(zip(missing, got))
            self.fetched += len(missing)

    def _read(self, obj: str) -> dict[str, dict[tuple[int, ...], Chunk]]:
        m = self.manifest
        entry = m.indexes.get(obj)
        if entry is None:
            raise CheckpointFormatError(
                f"{self.storage.uri_of(obj)}: a rule names this object, but the manifest lists no index for it"
            )
        name = entry["index"]
        where = self.storage.uri_of(name)
        raw = self.storage.read_bytes(name)
        if len(raw) != m.objects[name] or digest(raw) != entry["digest"]:
            raise CheckpointFormatError(f"{where}: the index does not match the size and digest the manifest records")
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT or doc.get("object") != obj:
                raise ValueError(f"not the index of {obj}")
            out: dict[str, dict[tuple[int, ...], Chunk]] = {}
            for key, recs in doc["chunks"].items():
                rec = m.tensors.get(key)
                if rec is None or rec.rule is None:
                    raise ValueError(f"{key} is not a rule tensor of the manifest")
                by_offsets = out.setdefault(key, {})
                for r in recs:
                    c = Chunk.from_json(r)
                    problem = f"names object {c.object}" if c.object != obj else m.chunk_problem(rec, c)
                    if problem:
                        raise ValueError(f"{key} chunk {c.box} {problem}")
                    by_offsets[c.box.offsets] = c
            return out
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointFormatError(f"{where}: malformed index ({e})") from None
