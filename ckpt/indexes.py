"""Object indexes: the chunk records of rule tensors, written beside each data object and read on demand.

A rank's save writes, after its data object, ``<object stem>.index.json`` holding the chunk
records (the manifest's chunk-record JSON) of its chunks of rule tensors; the manifest's
``indexes`` table names it with its xxh3 digest and ``objects`` with its size. A loading rank
computes from a rule which objects hold the cells it needs (ckpt/rules.py) and fetches only
their indexes, in parallel, each verified (size, digest) before use. An index holds the records
of every tensor its rank wrote, one line per tensor, but a loading rank needs a few of them: a
line is parsed, and its records become ``Chunk`` objects checked against the manifest and the
rule, only when a region asks for them. So what a
rank reads and parses at load grows with what it loads, not with the world size.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import xxhash

from .errors import CheckpointFormatError
from .format import Chunk, Manifest, _reason, _show, _typed, rank_object
from .regions import Box
from .rules import rule_chunks

FORMAT = "ckpt-index"


def encode_index(save_id: str, obj: str, records: dict[str, list[dict[str, Any]]]) -> bytes:
    """JSON lines: a head naming the keys, then one line per key with its chunk records, so a
    reader parses the lines of the keys it loads (compact JSON holds no raw newline)."""
    head = {"format": FORMAT, "save_id": save_id, "object": obj, "keys": list(records)}
    lines = [head, *records.values()]
    return "\n".join(json.dumps(line, separators=(",", ":")) for line in lines).encode()


def digest(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


class ObjectIndex:
    """One verified index: each key's line of records parsed, and each record turned into a checked
    ``Chunk``, on first lookup, since a loading rank uses a few of the records an index holds."""

    def __init__(self, where: str, obj: str, manifest: Manifest, lines: dict[str, bytes]) -> None:
        self.where, self.obj, self.manifest = where, obj, manifest
        self._lines = lines  # key -> its line of chunk-record JSON, unparsed
        self._by_offsets: dict[str, dict[tuple[int, ...], Any]] = {}  # key -> offsets -> JSON, then Chunk

    @classmethod
    def from_bytes(cls, raw: bytes, where: str, obj: str, manifest: Manifest) -> ObjectIndex:
        """The index of ``obj`` from its bytes (size and digest already checked): its head is parsed
        and checked now, each key's line when a load first needs that key."""
        lines = raw.split(b"\n")
        try:
            head = _typed(json.loads(lines[0]), dict, "the index head")
            if head.get("format") != FORMAT or head.get("object") != obj:
                raise ValueError(f"not the index of {obj}")
            keys = _typed(head["keys"], list, "keys")
            if len(keys) != len(lines) - 1 or len(set(keys)) != len(keys):
                raise ValueError(f"{len(keys)} keys listed, {len(lines) - 1} lines of records")
            for key in keys:
                rec = manifest.tensors.get(key) if isinstance(key, str) else None
                if rec is None or rec.rule is None:
                    raise ValueError(f"{_show(key)} is not a rule tensor of the manifest")
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(f"{where}: malformed index ({_reason(e)})") from None
        return cls(where, obj, manifest, dict(zip(keys, lines[1:])))

    def find(self, key: str, box: Box) -> Chunk:
        """The record of ``key``'s chunk ``box`` (computed from the rule), checked (FORMAT.md, rule 9)."""
        by_offsets = self._by_offsets.get(key)
        if by_offsets is None:
            by_offsets = self._by_offsets[key] = self._locate(key)
        found = by_offsets.get(box.offsets)
        if found is None:
            raise CheckpointFormatError(f"{self.where}: no record of {key} chunk {box}")
        if not isinstance(found, Chunk):
            found = by_offsets[box.offsets] = self._chunk(key, found)
        if found.box != box:
            raise CheckpointFormatError(f"{self.where}: no record of {key} chunk {box} (found {found.box})")
        return found

    def _locate(self, key: str) -> dict[tuple[int, ...], Any]:
        line = self._lines.get(key)
        try:
            recs = [] if line is None else _typed(json.loads(line), list, key)
            return {tuple(_typed(r, dict, "a chunk record")["offsets"]): r for r in recs}
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(f"{self.where}: malformed index ({_reason(e)})") from None

    def _chunk(self, key: str, record: Any) -> Chunk:
        try:
            c = Chunk.from_json(record)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(f"{self.where}: malformed index ({key}: {_reason(e)})") from None
        problem = f"names object {c.object}" if c.object != self.obj else None
        problem = problem or self.manifest.chunk_problem(self.manifest.tensors[key], c)
        if problem:
            raise CheckpointFormatError(f"{self.where}: malformed index ({key} chunk {c.box} {problem})")
        return c


class IndexSource:
    """Chunk records of a bound manifest's rule tensors, each index fetched once and verified."""

    def __init__(self, storage: Any, manifest: Manifest, threads: int = 16) -> None:
        self.storage, self.manifest, self.threads = storage, manifest, threads
        self._indexes: dict[str, ObjectIndex] = {}
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
        with self._lock:  # records are checked on first lookup, from any loading thread
            return [self._indexes[obj].find(key, chunk) for chunk, obj in wanted]

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

    def _read(self, obj: str) -> ObjectIndex:
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
        return ObjectIndex.from_bytes(raw, where, obj, m)
