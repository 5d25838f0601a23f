"""The on-disk format: manifest schema, dtype names, a manifest reader per format version, validation.

docs/FORMAT.md is the normative description; this module is its reader and
writer. The manifest is plain JSON (no pickle), written last, and validated on
read so that a damaged or foreign file fails with a message naming it. Reading
dispatches on the manifest's ``version`` to that version's reader (``READERS``),
so a new version is added beside the old ones instead of replacing them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import structure
from .errors import CheckpointFormatError, UnsupportedValueError
from .regions import Box
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
    length: int
    checksums: tuple[str, ...]

    def to_json(self) -> dict:
        return {
            **self.box.to_json(),
            "object": self.object,
            "offset": self.offset,
            "length": self.length,
            "checksums": list(self.checksums),
        }

    @classmethod
    def from_json(cls, d: dict) -> Chunk:
        return cls(
            Box(tuple(d["offsets"]), tuple(d["sizes"])),
            d["object"],
            int(d["offset"]),
            int(d["length"]),
            tuple(d["checksums"]),
        )


@dataclass
class TensorRecord:
    """A stored tensor: global shape, dtype (its manifest name) and chunks."""

    shape: tuple[int, ...]
    dtype_name: str  # a key of DTYPES; ``dtype`` is the torch dtype
    chunks: list[Chunk]
    layout: str = ""  # how it was sharded at save time; informational

    @property
    def dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype_name)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype_name][1]

    def to_json(self) -> dict:
        d: dict[str, Any] = {
            "shape": list(self.shape),
            "dtype": self.dtype_name,
            "chunks": [c.to_json() for c in self.chunks],
        }
        if self.layout:
            d["layout"] = self.layout
        return d

    @classmethod
    def from_json(cls, d: dict) -> TensorRecord:
        if d["dtype"] not in DTYPES:
            raise CheckpointFormatError(f"unknown dtype {d['dtype']!r} in manifest")
        return cls(tuple(d["shape"]), d["dtype"], [Chunk.from_json(c) for c in d["chunks"]], d.get("layout", ""))

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
        return dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json_bytes(cls, raw: bytes, where: str) -> Manifest:
        """Parse, dispatch on ``version`` to that version's reader, and validate."""
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointFormatError(f"{where}: manifest is not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise CheckpointFormatError(f"{where}: not a ckpt manifest")
        version = doc.get("version")
        reader = READERS.get(version) if type(version) is int else None
        if reader is None:
            readable = ", ".join(map(str, sorted(READERS)))
            raise CheckpointFormatError(
                f"{where}: format version {version!r} is not supported (this library reads {readable})"
            )
        manifest = reader(doc, where)
        manifest.validate(where)
        return manifest

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
        for key, rec in self.tensors.items():
            size = rec.itemsize
            for i, c in enumerate(rec.chunks):
                if not c.box.fits_in(rec.shape):
                    raise CheckpointFormatError(f"{where}: {key} chunk {i} {c.box} lies outside shape {rec.shape}")
                if c.length != c.box.numel * size:
                    raise CheckpointFormatError(f"{where}: {key} chunk {i} length {c.length} != box bytes")
                if c.object not in self.objects or c.offset + c.length > self.objects[c.object]:
                    raise CheckpointFormatError(
                        f"{where}: {key} chunk {i} bytes [{c.offset}, {c.offset + c.length}) outside object {c.object}"
                    )
                if len(c.checksums) != max(1, -(-c.length // self.block_bytes)):
                    raise CheckpointFormatError(f"{where}: {key} chunk {i} has a wrong number of checksums")
            covered = sum(c.box.numel for c in rec.chunks)
            if covered != math.prod(rec.shape):
                raise CheckpointFormatError(
                    f"{where}: {key}: chunks cover {covered} of {math.prod(rec.shape)} elements"
                )


def read_v1(doc: dict[str, Any], where: str) -> Manifest:
    """A version 1 manifest (docs/FORMAT.md) from its parsed JSON; validated by the caller."""
    if doc.get("checksum") != CHECKSUM_ALGORITHM:
        raise CheckpointFormatError(f"{where}: unknown checksum algorithm {doc.get('checksum')!r}")
    try:
        return Manifest(
            save_id=doc["save_id"],
            tensors={k: TensorRecord.from_json(v) for k, v in doc["tensors"].items()},
            values=doc["values"],
            objects={k: int(v) for k, v in doc["objects"].items()},
            block_bytes=int(doc["block_bytes"]),
            step=doc.get("step"),
            metrics=doc.get("metrics") or {},
            metadata=doc.get("metadata") or {},
            topology=doc.get("topology") or {},
            library_version=doc.get("library_version", ""),
            created=doc.get("created", ""),
            version=1,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


def read_v2(doc: dict[str, Any], where: str) -> Manifest:
    """A version 2 manifest: version 1's fields, values as typed JSON (ckpt/values.py), and
    the saved ``structure`` (ckpt/structure.py, checked by ``validate``)."""
    manifest = read_v1(doc, where)
    try:
        manifest.values = {k: decode(v) for k, v in manifest.values.items()}
        manifest.metrics, manifest.metadata = decode(manifest.metrics), decode(manifest.metadata)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{where}: {e}") from None
    manifest.structure = doc.get("structure")
    manifest.version = 2
    return manifest


# The manifest reader of each format version this library reads. A new version adds its
# reader here beside the older ones (and FORMAT_VERSION moves to it for writing).
READERS: dict[int, Callable[[dict[str, Any], str], Manifest]] = {1: read_v1, 2: read_v2}
