"""Safetensors framing: chunk specs, block checksums, and the one header writer and reader.

Every safetensors file this library writes (a checkpoint's data objects, a merge's
or an export's HF files) gets its header from :func:`safetensors_header` and its
data in :func:`frame_order`; every one it reads as foreign input is parsed by
:func:`read_safetensors_header`. docs/FORMAT.md ("Data objects", "Checksums") is
the byte-level description of what is here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import xxhash

from .errors import CheckpointFormatError
from .format import dtype_from_safetensors_code, safetensors_code
from .regions import Box

MAX_HEADER_BYTES = 100 << 20  # a longer header is refused before it is read

T = TypeVar("T")


@dataclass(frozen=True)
class ChunkSpec:
    """What a data object's header says of one chunk, before its bytes exist."""

    key: str
    box: Box
    dtype: torch.dtype
    stored: int | None = None  # encoded (compressed) bytes: a U8 entry of this many bytes in the header

    @property
    def nbytes(self) -> int:
        return self.box.numel * self.dtype.itemsize

    def entry(self) -> tuple[str, torch.dtype, tuple[int, ...]]:
        """(name, dtype, shape) of its header entry: the tensor, or the encoded bytes as U8."""
        if self.stored is not None:
            return self.name, torch.uint8, (self.stored,)
        return self.name, self.dtype, self.box.sizes

    @property
    def name(self) -> str:
        """The chunk's entry in the header: ``<key>@<o0>,<o1>,...``."""
        return f"{self.key}@{','.join(map(str, self.box.offsets))}"


# -- checksums ---------------------------------------------------------------------------------


def checksum(buf: memoryview) -> str:
    """XXH3-64 (seed 0) of ``buf`` as 16 lowercase hex digits: one block's checksum."""
    return xxhash.xxh3_64_hexdigest(buf)


def block_hasher() -> xxhash.xxh3_64:
    """An incremental :func:`checksum`, for a block that arrives in pieces."""
    return xxhash.xxh3_64()


def block_checksums(buf: memoryview, block_bytes: int) -> tuple[str, ...]:
    """One checksum per ``block_bytes`` block of a chunk; a chunk of no bytes has one."""
    if len(buf) == 0:
        return (checksum(buf),)
    return tuple(checksum(buf[i : i + block_bytes]) for i in range(0, len(buf), block_bytes))


def as_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")


def write_all(f, buf: memoryview) -> None:
    """Write every byte: raw files may take fewer than offered."""
    while len(buf):
        n = f.write(buf)
        if n is None or n == len(buf):
            return
        buf = buf[n:]


# -- writing -----------------------------------------------------------------------------------


def frame_order(items: Iterable[T], dtype: Callable[[T], torch.dtype]) -> list[T]:
    """Widest dtypes first (stable): with an 8-aligned header every tensor then starts at
    a multiple of its item size, so readers can view it in place."""
    return sorted(items, key=lambda item: -dtype(item).itemsize)


def safetensors_header(
    tensors: Iterable[tuple[str, torch.dtype, Sequence[int]]], metadata: Mapping[str, str], size: int | None = None
) -> bytes:
    """The bytes before the data: N (8 bytes, little-endian), then N bytes of compact JSON
    padded with spaces to a multiple of 8 (or to ``size`` bytes in all, a multiple of 8 at
    least as long), listing ``(name, dtype, shape)`` back to back."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    at = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": safetensors_code(dtype), "shape": list(shape), "data_offsets": [at, at + nbytes]}
        at += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    pad = -(len(raw) + 8) % 8 if size is None else size - 8 - len(raw)
    if pad < 0 or (len(raw) + pad + 8) % 8:
        raise ValueError(f"a header of {len(raw) + 8} bytes does not pad to {size}")
    raw += b" " * pad
    return len(raw).to_bytes(8, "little") + raw


def object_header(specs: Sequence[ChunkSpec], save_id: str, size: int | None = None) -> bytes:
    """A data object's header: its chunks in the order given, under ckpt's metadata. An encoded
    chunk is a U8 entry of its stored bytes (``ckpt/codec.py``; metadata ``"encoded": "zstd"``).
    ``size``: pad to that many bytes (a header reserved before the stored sizes were known)."""
    metadata = {"format": "ckpt", "save_id": save_id}
    if any(s.stored is not None for s in specs):
        metadata["encoded"] = "zstd"
    return safetensors_header((s.entry() for s in specs), metadata, size)


# -- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors file: bytes ``[start, stop)`` of the file hold it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    entries: dict[str, HeaderEntry]  # in header order
    data_start: int  # 8 + N


def read_safetensors_header(read_range: Callable[[int, int], bytes], size: int, where: str) -> SafetensorsHeader:
    """Parse and check the header of a safetensors file of ``size`` bytes, reading it with
    ``read_range(start, stop)``: the length fits the file (and ``MAX_HEADER_BYTES``), the
    header is a JSON object, and every tensor's byte range lies in the data section and
    holds exactly its dtype and shape. Raises :class:`CheckpointFormatError` naming ``where``
    and, for an entry, its name and byte range."""
    head = read_range(0, 8) if size >= 8 else b""
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointFormatError(f"{where}: not a safetensors file (header length {n}, file size {size})")
    try:
        header = json.loads(read_range(8, 8 + n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{where}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{where}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointFormatError(f"{where}: safetensors __metadata__ is not a JSON object")
    base = 8 + n
    data_bytes = size - base
    entries: dict[str, HeaderEntry] = {}
    for name, d in header.items():
        try:
            code, shape, (start, stop) = d["dtype"], tuple(d["shape"]), d["data_offsets"]
            if not all(_is_int(x) for x in (*shape, start, stop)):
                raise TypeError("not integers")
        except (KeyError, TypeError, ValueError):
            raise CheckpointFormatError(f"{where}: {name}: malformed header entry {d!r}") from None
        dtype = dtype_from_safetensors_code(code)
        if dtype is None:
            raise CheckpointFormatError(f"{where}: {name}: dtype {code} is not supported")
        nbytes = math.prod(shape) * dtype.itemsize
        if any(s < 0 for s in shape) or stop - start != nbytes or not 0 <= start <= stop <= data_bytes:
            raise CheckpointFormatError(
                f"{where}: {name}: bytes [{start}, {stop}) do not hold a {code} tensor of shape {list(shape)} "
                f"inside the {data_bytes} data bytes"
            )
        entries[name] = HeaderEntry(dtype, shape, base + start, base + stop)
    return SafetensorsHeader(metadata, entries, base)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
