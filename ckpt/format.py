"""The on-disk format: manifest schema, dtype names, a manifest reader per format version, validation.

docs/FORMAT.md is the normative description; this module is its reader and
writer. The manifest is plain JSON (no pickle), written last, and validated on
read so that a damaged or foreign file fails with a message naming it. Reading
dispatches on the manifest's ``version`` to that version's reader (``READERS``),
so a new version is added beside the old ones instead of replacing them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import structure
from .codec import Codec
from .errors import CheckpointFormatError, UnsupportedValueError
from .regions import Box, tiling_defect
from .values import decode, dumps, encode_checked

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "ckpt"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
DATA_DIR = "data"
STAGING_DIR = "_staging"
LATEST = "latest"  # a run root's marker naming its newest committed checkpoint (ckpt.Manager)
CHECKSUM_ALGORITHM = "xxh3-64"
DIGEST_ALGORITHM = "sha256"  # of the manifest itself (the ``digest`` field)
MAX_INT = (1 << 63) - 1  # every count, size and offset of a manifest fits a signed 64-bit integer
RANK = "{rank}"  # in a manifest's ``rank_objects``: the writer rank, 5+ decimal digits
SPREAD = "{spread}"  # in ``rank_objects``: the rank modulo SPREAD_PREFIXES, 2 digits
SPREAD_PREFIXES = 64  # saves of more ranks put their objects under this many key prefixes
SPREAD_ABOVE = 64


def spread_prefix(rank: int, world: int) -> str:
    """``"NN/"`` (the rank modulo 64) in a save of more than 64 ranks, else ``""``: thousands of
    ranks writing at once spread their requests over 64 key prefixes, which an object store
    can partition (S3's request limits are per partitioned prefix)."""
    return f"{rank % SPREAD_PREFIXES:02d}/" if world > SPREAD_ABOVE else ""


def object_name(save_id: str, rank: int, world: int = 1) -> str:
    """The data object a rank of ``ckpt.save`` writes."""
    return f"{DATA_DIR}/{spread_prefix(rank, world)}{save_id}-r{rank:05d}.safetensors"


def object_pattern(save_id: str, world: int) -> str:
    """``object_name`` for every rank at once: a manifest's ``rank_objects``."""
    spread = f"{SPREAD}/" if world > SPREAD_ABOVE else ""
    return f"{DATA_DIR}/{spread}{save_id}-r{RANK}.safetensors"


def rank_object(pattern: str, rank: int) -> str:
    return pattern.replace(SPREAD, f"{rank % SPREAD_PREFIXES:02d}").replace(RANK, f"{rank:05d}")


def index_name(obj: str) -> str:
    """The chunk index written beside data object ``obj`` (Version 2: object indexes)."""
    return obj.removesuffix(".safetensors") + ".index.json"

# manifest name (also the torch attribute: torch.<name>) -> (safetensors code, bytes per element).
# Plain names, so reading a manifest needs no torch (the CLI lists checkpoints without it).
DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
    "float8_e4m3fnuz": ("F8_E4M3FNUZ", 1),
    "float8_e5m2fnuz": ("F8_E5M2FNUZ", 1),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint64": ("U64", 8),
    "uint32": ("U32", 4),
    "uint16": ("U16", 2),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
    "complex64": ("C64", 8),
}
_BY_CODE = {code: name for name, (code, _) in DTYPES.items()}


def dtype_name(dtype: torch.dtype, key: str = "") -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise UnsupportedValueError(f"{key or 'tensor'}: dtype {dtype} cannot be stored")
    return name


def safetensors_code(dtype: torch.dtype) -> str:
    return DTYPES[dtype_name(dtype)][0]


def dtype_from_safetensors_code(code: object) -> torch.dtype | None:
    """The dtype of a safetensors code this library knows, else None."""
    name = _BY_CODE.get(code) if isinstance(code, str) else None
    return None if name is None else dtype_from_name(name)


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointFormatError(f"unknown dtype {name!r} in manifest")
    import torch

    return getattr(torch, name)


def itemsize(dtype: torch.dtype | str) -> int:
    """Bytes per element of a storable dtype (a torch dtype or its manifest name)."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name in DTYPES:
        return DTYPES[name][1]
    return dtype.itemsize  # type: ignore[union-attr]  # a dtype ckpt does not store (only for sizes)


def is_contained(name: str) -> bool:
    """Whether an object name stays inside its checkpoint: relative, no '..', no
    empty or '.' parts, no backslashes. A crafted manifest must not make a reader
    open files elsewhere."""
    parts = name.split("/")
    return bool(name) and "\\" not in name and all(p not in ("", ".", "..") for p in parts) and ":" not in parts[0]


def _int(x: Any, what: str, lo: int = 0) -> int:
    """``x`` if it is a JSON integer in [lo, MAX_INT] (not a bool, float or string), else ValueError."""
    if type(x) is not int or not lo <= x <= MAX_INT:
        raise ValueError(f"{what} must be an integer in [{lo}, 2**63), not {_show(x)}")
    return x


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if type(x) is list and all(type(v) is int and 0 <= v <= MAX_INT for v in x):
        return tuple(x)
    if type(x) is not list:
        raise ValueError(f"{what} must be a list of integers, not {_show(x)}")
    return tuple(_int(v, what) for v in x)  # raises, naming the bad entry


def _typed(x: Any, kind: type, what: str) -> Any:
    if type(x) is not kind:
        raise ValueError(f"{what} must be a JSON {kind.__name__}, not {_show(x)}")
    return x


def _show(x: Any) -> str:
    text = json.dumps(x, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


def seal(body: bytes) -> bytes:
    """The manifest as written: ``body`` (a compact JSON object) with its digest appended as the last member."""
    digest = f"{DIGEST_ALGORITHM}:{hashlib.sha256(body).hexdigest()}"
    return body[:-1] + b',"digest":"' + digest.encode() + b'"}'


def check_digest(raw: bytes, doc: dict[str, Any], where: str) -> None:
    """Refuse a manifest whose bytes changed after it was written (bit rot, a hand edit, a torn copy).

    The digest is the last member; it covers the bytes before it with ``}`` closing them, i.e.
    the manifest as serialized before the digest was added, so verifying needs no re-serialization.
    """
    recorded = doc.get("digest")
    if not isinstance(recorded, str) or not recorded.startswith(f"{DIGEST_ALGORITHM}:"):
        raise CheckpointFormatError(f"{where}: manifest digest {_show(recorded)} is not a {DIGEST_ALGORITHM} digest")
    suffix = b',"digest":' + json.dumps(recorded).encode() + b"}"
    if not raw.endswith(suffix):
        raise CheckpointFormatError(f"{where}: manifest was rewritten after it was sealed (digest not last)")
    computed = f"{DIGEST_ALGORITHM}:{hashlib.sha256(raw[: -len(suffix)] + b'}').hexdigest()}"
    if computed != recorded:
        raise CheckpointFormatError(
            f"{where}: manifest digest mismatch: the file changed after it was written "
            f"(recorded {recorded}, computed {computed})"
        )


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` can be a sibling checkpoint under a run root (one path component,
    not hidden, not ``_staging`` or the like, not the ``latest`` marker)."""
    return is_contained(name) and "/" not in name and not name.startswith((".", "_")) and name != LATEST


def ref_object(sibling: str, rel: str) -> str:
    """How a chunk record names object ``rel`` of sibling checkpoint ``sibling``."""
    return f"../{sibling}/{rel}"


def split_ref(name: str) -> tuple[str, str] | None:
    """``../<sibling>/<rel>`` -> (sibling, rel); None for an object of the checkpoint itself."""
    if not name.startswith("../"):
        return None
    sibling, _, rel = name[3:].partition("/")
    return sibling, rel


@dataclass(frozen=True)
class Chunk:
    """A box of a global tensor stored row-major at ``[offset, offset+length)`` of ``object``.

    ``checksums`` has one xxh3-64 digest per ``block_bytes`` block of the chunk
    (the last one shorter), so a reader that needs part of a chunk verifies the
    blocks it reads without reading the rest.
    """

    box: Box
    object: str
    offset: int
    length: int  # raw bytes of the box (row-major), whatever the encoding
    checksums: tuple[str, ...]
    codec: Codec | None = None  # None: stored raw; else compressed frames (ckpt/codec.py)
    digest: str | None = None  # content digest of the raw bytes ("blake3:<hex>"), when computed

    @property
    def stored(self) -> int:
        """Bytes the chunk occupies in its object from ``offset``."""
        return self.length if self.codec is None else self.codec.stored

    def to_json(self) -> dict:
        d = {
            **self.box.to_json(),
            "object": self.object,
            "offset": self.offset,
            "length": self.length,
            "checksums": list(self.checksums),
        }
        if self.codec is not None:
            d["codec"] = self.codec.to_json()
        if self.digest is not None:
            d["digest"] = self.digest
        return d

    @classmethod
    def from_json(cls, d: dict) -> Chunk:
        """A chunk record, its types checked (ValueError or KeyError naming the field otherwise)."""
        _typed(d, dict, "a chunk record")
        checksums = _typed(d["checksums"], list, "checksums")
        for c in checksums:
            _typed(c, str, "a checksum")
        codec = d.get("codec")
        digest = d.get("digest")
        return cls(
            Box(_ints(d["offsets"], "offsets"), _ints(d["sizes"], "sizes")),
            _typed(d["object"], str, "object"),
            _int(d["offset"], "offset"),
            _int(d["length"], "length"),
            tuple(checksums),
            None if codec is None else Codec.from_json(_typed(codec, dict, "codec")),
            None if digest is None else _typed(digest, str, "digest"),
        )


@dataclass(frozen=True, eq=False)
class Mesh:
    """A device mesh as a save saw it: its shape and the save group's rank at each position
    (row-major). Compared and hashed by identity: it keys caches, and lists up to W ranks."""

    shape: tuple[int, ...]
    ranks: tuple[int, ...]

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "ranks": list(self.ranks)}

    @classmethod
    def from_json(cls, d: Any) -> Mesh:
        _typed(d, dict, "a mesh")
        mesh = cls(_ints(d["shape"], "mesh shape"), _ints(d["ranks"], "mesh ranks"))
        if not mesh.shape or math.prod(mesh.shape) != len(mesh.ranks) or 0 in mesh.shape:
            raise ValueError(f"a mesh of shape {list(mesh.shape)} lists {len(mesh.ranks)} ranks")
        return mesh


@dataclass(frozen=True)
class Rule:
    """A tensor stored by rule (ckpt/rules.py): the layout it was saved in. Its chunks are
    computable; their records live in the writers' object indexes (ckpt/indexes.py)."""

    meshes: tuple[int, ...]  # indexes into the manifest's ``meshes``: one per copy (replica group)
    placements: tuple[str, ...]
    chunk_bytes: int

    def to_json(self) -> dict:
        return {"meshes": list(self.meshes), "placements": list(self.placements), "chunk_bytes": self.chunk_bytes}

    @classmethod
    def from_json(cls, d: Any) -> Rule:
        _typed(d, dict, "a rule")
        names = tuple(_typed(p, str, "a placement") for p in _typed(d["placements"], list, "placements"))
        return cls(_ints(d["meshes"], "rule meshes"), names, _int(d["chunk_bytes"], "chunk_bytes", lo=1))


class LazyChunks(Sequence):
    """The chunk list of a rule tensor, read from object indexes on first use. The load path
    asks ``TensorRecord.chunks_in`` instead, which reads only the indexes a region needs."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.source: Any = None  # ckpt.indexes.IndexSource, set by Manifest.bind
        self._all: list[Chunk] | None = None

    def resolve(self) -> Any:
        if self.source is None:
            raise CheckpointFormatError(
                f"{self.key}: stored by rule; its chunk records are in object indexes, which a manifest "
                "not bound to its storage cannot read (ckpt.locate.read_manifest binds it)"
            )
        return self.source

    def _list(self) -> list[Chunk]:
        if self._all is None:
            self._all = self.resolve().all_chunks(self.key)
        return self._all

    def __len__(self) -> int:
        return len(self._list())

    def __getitem__(self, i):  # type: ignore[override]
        return self._list()[i]

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self._list())


@dataclass
class TensorRecord:
    """A stored tensor: global shape, dtype (its manifest name) and chunks (or, Version 2, the
    rule that computes them)."""

    shape: tuple[int, ...]
    dtype_name: str  # a key of DTYPES; ``dtype`` is the torch dtype
    chunks: Sequence[Chunk]  # a list, or LazyChunks for a rule tensor
    layout: str = ""  # how it was sharded at save time; informational
    rule: Rule | None = None

    def chunks_in(self, box: Box) -> list[Chunk]:
        """The stored chunks intersecting ``box``; for a rule tensor, read from the indexes of
        just the objects that hold them."""
        if isinstance(self.chunks, LazyChunks):
            return self.chunks.resolve().chunks_in(self.chunks.key, box)
        return [c for c in self.chunks if c.box.intersect(box) is not None]

    @property
    def dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype_name)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype_name][1]

    def to_json(self) -> dict:
        d: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype_name}
        if self.rule is not None:
            d["rule"] = self.rule.to_json()
        else:
            d["chunks"] = [c.to_json() for c in self.chunks]
        if self.layout:
            d["layout"] = self.layout
        return d

    @classmethod
    def from_json(cls, d: dict, key: str = "") -> TensorRecord:
        _typed(d, dict, "a tensor record")
        dtype = _typed(d["dtype"], str, "dtype")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {_show(dtype)}")
        if "rule" in d:
            layout = _typed(d.get("layout", ""), str, "layout")
            return cls(_ints(d["shape"], "shape"), dtype, LazyChunks(key), layout, Rule.from_json(d["rule"]))
        chunks = []
        for i, c in enumerate(_typed(d["chunks"], list, "chunks")):
            try:
                chunks.append(Chunk.from_json(c))
            except (KeyError, ValueError) as e:
                raise ValueError(f"chunk {i}: {_reason(e)}") from None
        return cls(
            _ints(d["shape"], "shape"),
            dtype,
            chunks,
            _typed(d.get("layout", ""), str, "layout"),
        )

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


@dataclass
class Manifest:
    save_id: str
    tensors: dict[str, TensorRecord]
    values: dict[str, Any]
    objects: dict[str, int]  # object path -> size in bytes
    block_bytes: int
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    topology: dict[str, Any] = field(default_factory=dict)
    library_version: str = ""
    created: str = ""
    structure: Any = None  # the saved nesting (ckpt.structure); None: unknown, inferred from the keys
    version: int = FORMAT_VERSION  # of the file it was read from
    # objects of earlier checkpoints under the same run root that chunks name (as
    # ``../<sibling>/<rel>``): sibling -> {rel: size}. Never deleted with this checkpoint.
    refs: dict[str, dict[str, int]] = field(default_factory=dict)
    # Version 2, rule tensors: the meshes their rules name, the data object of a writer rank
    # (``rank_object``), and each data object's index: {"index": path, "digest": xxh3 hex}.
    meshes: list[Mesh] = field(default_factory=list)
    rank_objects: str = ""
    indexes: dict[str, dict[str, str]] = field(default_factory=dict)

    def bind(self, storage: Any) -> Manifest:
        """Let rule tensors read their chunk records from ``storage`` (the checkpoint's location)."""
        lazy = [rec.chunks for rec in self.tensors.values() if isinstance(rec.chunks, LazyChunks)]
        if lazy:
            from .indexes import IndexSource

            source = IndexSource(storage, self)
            for chunks in lazy:
                chunks.source = source
        return self

    def grid_of(self, rec: TensorRecord) -> tuple[Any, list[Mesh]]:
        """The ``rules.Grid`` of a rule tensor and the meshes its copies live on."""
        from .rules import grid

        assert rec.rule is not None
        meshes = [self.meshes[m] for m in rec.rule.meshes]
        return grid(tuple(rec.shape), meshes[0].shape, rec.rule.placements), meshes

    def object_size(self, name: str) -> int | None:
        """The size of an object a chunk may name (own or referenced), None if not listed."""
        ref = split_ref(name)
        if ref is None:
            return self.objects.get(name)
        return self.refs.get(ref[0], {}).get(ref[1])

    @property
    def shared_bytes(self) -> int:
        """Bytes of the objects of earlier checkpoints this one references."""
        return sum(sum(objs.values()) for objs in self.refs.values())

    def tree(self) -> Any:
        """The saved nesting: as recorded, or inferred from the flat keys (version 1)."""
        if self.structure is not None:
            return self.structure
        return structure.infer(sorted([*self.values, *self.tensors]))

    def to_json_bytes(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "save_id": self.save_id,
            "library_version": self.library_version,
            "created": self.created,
            "step": self.step,
            "metrics": encode_checked(self.metrics, "metrics"),
            "metadata": encode_checked(self.metadata, "metadata"),
            "topology": self.topology,
            "checksum": CHECKSUM_ALGORITHM,
            "block_bytes": self.block_bytes,
            "objects": self.objects,
            "values": {k: encode_checked(v, k) for k, v in self.values.items()},
            "tensors": {k: v.to_json() for k, v in sorted(self.tensors.items())},
        }
        if self.structure is not None:
            doc["structure"] = self.structure
        if self.refs:
            doc["refs"] = self.refs
        if self.meshes:
            doc["meshes"] = [m.to_json() for m in self.meshes]
        if self.rank_objects:
            doc["rank_objects"] = self.rank_objects
        if self.indexes:
            doc["indexes"] = self.indexes
        return seal(dumps(doc, separators=(",", ":")).encode())

    @classmethod
    def from_json_bytes(cls, raw: bytes, where: str, storage: Any = None) -> Manifest:
        """Parse, dispatch on ``version`` to that version's reader, and validate; with the
        checkpoint's ``storage``, rule tensors can read their object indexes (``bind``)."""
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise CheckpointFormatError(f"{where}: manifest is not valid JSON ({_reason(e)})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise CheckpointFormatError(f"{where}: not a ckpt manifest")
        version = doc.get("version")
        reader = READERS.get(version) if type(version) is int else None
        if reader is None:
            readable = ", ".join(map(str, sorted(READERS)))
            raise CheckpointFormatError(
                f"{where}: format version {version!r} is not supported (this library reads {readable})"
            )
        if version >= 2:  # version 1 had no digest
            check_digest(raw, doc, where)
        manifest = reader(doc, where)
        manifest.validate(where)
        return manifest if storage is None else manifest.bind(storage)

    def validate(self, where: str) -> None:
        """Structural checks that make later reads safe: chunks inside their
        tensor and their object, checksum counts that match the block size, and
        chunks that account for every element (a tensor with a chunk missing,
        e.g. from an aborted stream, must never be committed or loaded)."""
        if self.structure is not None:
            structure.validate(self.structure, where)
            if set(structure.leaves(self.structure)) != set(self.tensors) | set(self.values):
                raise CheckpointFormatError(f"{where}: the structure's leaves are not the stored keys")
        if self.block_bytes <= 0:
            raise CheckpointFormatError(f"{where}: block_bytes must be positive")
        for name in self.objects:
            if not is_contained(name):
                raise CheckpointFormatError(f"{where}: object {name!r} is not a path inside the checkpoint")
        for sibling, objs in self.refs.items():
            if not is_checkpoint_name(sibling) or not all(is_contained(rel) for rel in objs):
                raise CheckpointFormatError(f"{where}: refs name {sibling!r} outside the run root")
        for obj, entry in self.indexes.items():
            if obj not in self.objects or entry.get("index") not in self.objects:
                raise CheckpointFormatError(f"{where}: the index of {obj!r} or the object itself is not listed")
            if not re.fullmatch(r"[0-9a-f]{16}", entry.get("digest", "")):
                raise CheckpointFormatError(f"{where}: the index of {obj!r} has no valid digest")
        for key, rec in self.tensors.items():
            size = rec.itemsize
            if key in self.values:
                raise CheckpointFormatError(f"{where}: {key} is both a tensor and a value")
            if math.prod(rec.shape) * size > MAX_INT:
                raise CheckpointFormatError(f"{where}: {key}: shape {list(rec.shape)} is too large")
            if rec.rule is not None:
                self._validate_rule(key, rec, where)
                continue
            for i, c in enumerate(rec.chunks):
                problem = self.chunk_problem(rec, c)
                if problem:
                    raise CheckpointFormatError(f"{where}: {key} chunk {i} {problem}")
            covered = sum(c.box.numel for c in rec.chunks)
            if covered != math.prod(rec.shape):
                raise CheckpointFormatError(
                    f"{where}: {key}: chunks cover {covered} of {math.prod(rec.shape)} elements"
                )
            defect = tiling_defect(rec.shape, [c.box for c in rec.chunks])
            if defect is not None:
                raise CheckpointFormatError(f"{where}: {key}: {_describe_defect(rec, defect)}")


    def chunk_problem(self, rec: TensorRecord, c: Chunk) -> str | None:
        """What is wrong with chunk record ``c`` of ``rec`` (inline, or from an object index)."""
        size = rec.itemsize
        if not c.box.fits_in(rec.shape):
            return f"{c.box} lies outside shape {rec.shape}"
        if c.length != c.box.numel * size:
            return f"length {c.length} != box bytes"
        if c.codec is not None:
            problem = c.codec.problem(c.length, self.block_bytes, size)
            if problem:
                return f"codec: {problem}"
        limit = self.object_size(c.object)
        if limit is None or c.offset < 0 or c.offset + c.stored > limit:
            return f"bytes [{c.offset}, {c.offset + c.stored}) outside object {c.object}"
        if c.codec is None and c.offset % size:  # compressed frames are bytes: any offset
            return f"starts at byte {c.offset} of {c.object}, not a multiple of its item size {size}"
        if len(c.checksums) != max(1, -(-c.length // self.block_bytes)):
            return "has a wrong number of checksums"
        return None

    def _validate_rule(self, key: str, rec: TensorRecord, where: str) -> None:
        """A rule covers its tensor by construction; check that it is one (its placements
        partition the shape) and that its writers' objects can be named."""
        rule = rec.rule
        assert rule is not None
        if not rule.meshes or any(not 0 <= m < len(self.meshes) for m in rule.meshes):
            raise CheckpointFormatError(f"{where}: {key}: rule names meshes {list(rule.meshes)} of {len(self.meshes)}")
        if len({self.meshes[m].shape for m in rule.meshes}) != 1:
            raise CheckpointFormatError(f"{where}: {key}: rule names meshes of different shapes")
        if not rec.shape or math.prod(rec.shape) == 0:
            raise CheckpointFormatError(f"{where}: {key}: a rule needs a non-empty tensor")
        if RANK not in self.rank_objects or not is_contained(rank_object(self.rank_objects, 0)):
            raise CheckpointFormatError(f"{where}: {key}: stored by rule, but rank_objects is {self.rank_objects!r}")
        try:
            self.grid_of(rec)
        except ValueError as e:
            raise CheckpointFormatError(f"{where}: {key}: {e}") from None


def _describe_defect(rec: TensorRecord, point: tuple[int, ...]) -> str:
    """Which chunks hold the element where the chunks fail to tile their tensor."""
    at = Box(point, (1,) * len(point))
    holders = [(i, c) for i, c in enumerate(rec.chunks) if c.box.contains(at)] if at.fits_in(rec.shape) else []
    named = "; ".join(f"chunk {i} {c.box} in {c.object} bytes [{c.offset}, {c.offset + c.length})" for i, c in holders)
    if len(holders) > 1:
        return f"chunks overlap at element {list(point)} ({named})"
    if not holders and at.fits_in(rec.shape):
        return f"element {list(point)} is in no chunk"
    return f"chunks do not cover each element exactly once (near element {list(point)})"


def _reason(e: BaseException) -> str:
    """An exception's message without KeyError's quotes."""
    return f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else f"{e}"


def read_v1(doc: dict[str, Any], where: str) -> Manifest:
    """A version 1 manifest (docs/FORMAT.md) from its parsed JSON; validated by the caller.

    Every field's type is checked here, so that later code never meets a string where it
    expects a number (a crafted or damaged manifest fails here, naming the field)."""
    if doc.get("checksum") != CHECKSUM_ALGORITHM:
        raise CheckpointFormatError(f"{where}: unknown checksum algorithm {_show(doc.get('checksum'))}")
    try:
        tensors = {}
        for key, rec in _typed(doc["tensors"], dict, "tensors").items():
            try:
                tensors[key] = TensorRecord.from_json(rec, key)
            except (KeyError, ValueError, CheckpointFormatError) as e:
                raise ValueError(f"tensor {key}: {_reason(e)}") from None
        step = doc.get("step")
        return Manifest(
            save_id=_typed(doc["save_id"], str, "save_id"),
            tensors=tensors,
            values=_typed(doc["values"], dict, "values"),
            objects={k: _int(v, f"size of object {k}") for k, v in _typed(doc["objects"], dict, "objects").items()},
            block_bytes=_int(doc["block_bytes"], "block_bytes", lo=1),
            step=None if step is None else _int(step, "step", lo=-MAX_INT),
            metrics=_typed(doc.get("metrics") or {}, dict, "metrics"),
            metadata=doc.get("metadata") or {},
            topology=_typed(doc.get("topology") or {}, dict, "topology"),
            library_version=_typed(doc.get("library_version", ""), str, "library_version"),
            created=_typed(doc.get("created", ""), str, "created"),
            version=1,
        )
    except (KeyError, ValueError) as e:
        raise CheckpointFormatError(f"{where}: malformed manifest: {_reason(e)}") from None


def read_v2(doc: dict[str, Any], where: str) -> Manifest:
    """A version 2 manifest: version 1's fields, values as typed JSON (ckpt/values.py), and
    the saved ``structure`` (ckpt/structure.py, checked by ``validate``)."""
    manifest = read_v1(doc, where)
    try:
        manifest.values = {k: decode(v) for k, v in manifest.values.items()}
        manifest.metrics, manifest.metadata = decode(manifest.metrics), decode(manifest.metadata)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{where}: {e}") from None
    except RecursionError:
        raise CheckpointFormatError(f"{where}: a value is nested too deeply") from None
    if not isinstance(manifest.metrics, dict):
        raise CheckpointFormatError(f"{where}: metrics must be an object of named values")
    manifest.structure = doc.get("structure")
    refs = doc.get("refs") or {}
    try:
        manifest.refs = {str(s): {str(k): int(v) for k, v in objs.items()} for s, objs in refs.items()}
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{where}: malformed refs ({type(e).__name__}: {e})") from None
    try:
        manifest.meshes = [Mesh.from_json(m) for m in _typed(doc.get("meshes", []), list, "meshes")]
        manifest.rank_objects = _typed(doc.get("rank_objects", ""), str, "rank_objects")
        manifest.indexes = {
            k: {"index": _typed(v["index"], str, "index"), "digest": _typed(v["digest"], str, "digest")}
            for k, v in _typed(doc.get("indexes", {}), dict, "indexes").items()
        }
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{where}: malformed manifest: {_reason(e)}") from None
    manifest.version = 2
    return manifest


# The manifest reader of each format version this library reads. A new version adds its
# reader here beside the older ones (and FORMAT_VERSION moves to it for writing).
READERS: dict[int, Callable[[dict[str, Any], str], Manifest]] = {1: read_v1, 2: read_v2}
