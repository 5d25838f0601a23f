"""Chunk encodings: byte planes + zstd in independent frames, and the content digest of a chunk.

A compressed chunk is cut into frames of ``block_bytes`` uncompressed bytes (the
checksum blocks), each encoded on its own, so a ranged read fetches and
decodes only the frames it needs. Byte grouping splits a frame's bytes into
planes (every element's byte 0, then every byte 1, ...): the sign/exponent bytes
of floating-point values repeat far more than their mantissa bytes, which zstd
alone does not see. Each plane is stored raw or as one zstd frame, decided per
plane per frame from a 64 KiB sample, so zstd spends its time (on save and on
load) only on the planes that shrink. A frame that shrinks by less than 1/64 is
stored raw (its stored length then equals its uncompressed length, which an
encoded frame never has). Frames are compressed and digests computed on a
thread pool: zstd, blake3 and numpy's copies release the GIL.
docs/FORMAT.md ("Compressed chunks") is the byte-level description.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import CorruptChunkError

if TYPE_CHECKING:  # imported where used: the manifest reader (Codec) needs none of them
    import zstandard

ZSTD = "zstd"
BYTEGROUP = "bytegroup"  # one zstd frame of all planes (read; written before byteplanes)
BYTEPLANES = "byteplanes"  # a plane table, then each plane raw or one zstd frame
SAMPLE_BYTES = 64 << 10
DIGEST = "blake3"  # content digests: "blake3:" + 32 hex digits (the first 128 bits)

_tls = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool() -> ThreadPoolExecutor:
    """Threads that compress frames and hash chunks, one per core."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="ckpt-codec")
        return _pool


def _forget_pool() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


@dataclass(frozen=True)
class Codec:
    """A chunk record's ``codec``: how its stored bytes encode its ``length`` raw bytes.

    ``frames[i]`` is the stored size of frame i, which holds raw bytes
    ``[i * frame_bytes, (i + 1) * frame_bytes)`` of the chunk; frames lie back to back
    from the chunk's ``offset``.
    """

    name: str
    transform: str | None
    frame_bytes: int
    frames: tuple[int, ...]

    @property
    def stored(self) -> int:
        return sum(self.frames)

    def frame_start(self, i: int) -> int:
        """Offset of frame ``i`` from the chunk's first stored byte (``i == len(frames)``: the end)."""
        return sum(self.frames[:i])

    def to_json(self) -> dict:
        return {"name": self.name, "transform": self.transform, "frame_bytes": self.frame_bytes,
                "frames": list(self.frames)}

    @classmethod
    def from_json(cls, d: dict) -> Codec:
        """A record's ``codec``, its JSON types checked (ValueError or KeyError naming the field)."""
        name, transform, frame_bytes, frames = d["name"], d.get("transform"), d["frame_bytes"], d["frames"]
        if type(name) is not str or not (transform is None or type(transform) is str):
            raise ValueError(f"codec name and transform must be strings, not {name!r}, {transform!r}")
        if type(frame_bytes) is not int or type(frames) is not list or any(type(f) is not int for f in frames):
            raise ValueError("codec frame_bytes and frames must be integers")
        return cls(name, transform, frame_bytes, tuple(frames))

    def problem(self, length: int, block_bytes: int, itemsize: int) -> str | None:
        """Why this codec cannot describe a chunk of ``length`` bytes, or None."""
        if self.name != ZSTD:
            return f"unknown codec {self.name!r}"
        if self.transform not in (None, BYTEGROUP, BYTEPLANES):
            return f"unknown transform {self.transform!r}"
        if self.frame_bytes != block_bytes:
            return f"frame_bytes {self.frame_bytes} != block_bytes {block_bytes}"
        if self.transform in (BYTEGROUP, BYTEPLANES) and block_bytes % itemsize:
            return "frames do not hold whole elements"
        if len(self.frames) != max(1, -(-length // block_bytes)):
            return f"{len(self.frames)} frames for {length} bytes"
        for i, f in enumerate(self.frames):
            raw = min(block_bytes, length - i * block_bytes)
            if not 0 < f <= raw:
                return f"frame {i} stores {f} bytes for {raw}"
        return None


@dataclass
class Encoded:
    """A chunk's stored frames, their checksums (of the stored bytes) and its codec."""

    frames: list[bytes | memoryview]
    codec: Codec
    checksums: tuple[str, ...]


def digest(buf: memoryview) -> str:
    """The content digest of a chunk's raw bytes."""
    import blake3

    return f"{DIGEST}:{blake3.blake3(buf, max_threads=1).hexdigest(16)}"


# Byte-grouped frames, at every level: the level's zstd parameters with matches of at least 7 bytes
# and a 256-entry hash table. Exponent planes are low-entropy noise whose short matches are mostly chance: hunting
# them costs time and splits literal runs, so the Huffman-coded literals (where the gain is) get
# worse. Measured on the packaged model's planes: bf16 1.46x at 291 MB/s per core becomes 1.49x at
# ~840 MB/s, fp32 1.20x at 566 MB/s becomes 1.21x at ~1150 MB/s; decompression ~1.7x faster.
# Higher levels find nothing more in such planes (randn bf16: level 1 1.49x at 394 MB/s, level 3
# 1.41x at 96 MB/s with its own parameters, 1.44x at 138 MB/s with these, level 6 1.49x at 63 MB/s).
PLANE_PARAMS = {"min_match": 7, "hash_log": 8}


def _compressor(level: int, planes: bool) -> zstandard.ZstdCompressor:
    import zstandard

    cache = getattr(_tls, "compressors", None)
    if cache is None:
        cache = _tls.compressors = {}
    c = cache.get((level, planes))
    if c is None:
        if planes:
            params = zstandard.ZstdCompressionParameters.from_level(level, **PLANE_PARAMS)
            c = zstandard.ZstdCompressor(compression_params=params)
        else:
            c = zstandard.ZstdCompressor(level=level)
        cache[(level, planes)] = c
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    import zstandard

    d = getattr(_tls, "decompressor", None)
    if d is None:
        d = _tls.decompressor = zstandard.ZstdDecompressor()
    return d


def _group(raw: memoryview, itemsize: int) -> memoryview:
    """Bytes as planes: byte 0 of every element, then byte 1, ..."""
    import numpy as np

    planes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T.copy()
    return memoryview(planes).cast("B")


def _squeezes(c: zstandard.ZstdCompressor, plane, n: int) -> bool:
    """Whether a plane of ``n`` bytes is worth compressing, judged from 64 KiB of its middle
    (mantissa planes are noise: zstd would only confirm it, at ~3 GB/s)."""
    if n <= 2 * SAMPLE_BYTES:
        return True
    at = (n - SAMPLE_BYTES) // 2
    return len(c.compress(plane[at : at + SAMPLE_BYTES])) * 64 <= SAMPLE_BYTES * 63


def _encode_planes(raw: memoryview, itemsize: int, level: int) -> bytes | memoryview:
    """A ``byteplanes`` frame (docs/FORMAT.md): the plane table, then each plane raw or compressed.
    The planes are gathered into this thread's scratch (reused: a fresh buffer per frame costs
    its page faults), and the frame is joined from the table and the planes' stored bytes."""
    import numpy as np

    n, c = len(raw) // itemsize, _compressor(level, True)
    scratch = getattr(_tls, "planes", None)
    if scratch is None or scratch.size < len(raw):
        scratch = _tls.planes = np.empty(len(raw), dtype=np.uint8)
    planes = scratch[: len(raw)].reshape(itemsize, n)
    np.copyto(planes, np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T)
    stored: list = []
    for plane in planes:
        packed = c.compress(plane) if _squeezes(c, plane, n) else None
        stored.append(plane if packed is None or len(packed) * 64 > n * 63 else packed)  # raw: no zstd on load
    sizes = [len(p) for p in stored]
    if (4 * itemsize + sum(sizes)) * 64 > len(raw) * 63:
        return raw
    return b"".join([np.array(sizes, dtype="<u4").tobytes(), *stored])


def encode_frame(raw: memoryview, itemsize: int, level: int, byte_group: bool) -> bytes | memoryview:
    """One frame's stored bytes: compressed, or ``raw`` itself if compression saves less than
    1/64 of it (a reader then copies it instead of decompressing it). Byte-grouped (itemsize > 1):
    a ``byteplanes`` frame."""
    if byte_group and itemsize > 1:
        return _encode_planes(raw, itemsize, level)
    out = _compressor(level, False).compress(raw)
    return out if len(out) * 64 <= len(raw) * 63 else raw


def transform_for(itemsize: int, byte_group: bool) -> str | None:
    return BYTEPLANES if byte_group and itemsize > 1 else None


def finish(frames: Sequence[bytes | memoryview], block_bytes: int, transform: str | None,
           checksums: Sequence[str]) -> Encoded:
    """The record of frames compressed by :func:`encode_frame`, with their checksums."""
    codec = Codec(ZSTD, transform, block_bytes, tuple(len(f) for f in frames))
    return Encoded(list(frames), codec, tuple(checksums))


def decode_frame(stored: memoryview, codec: Codec, i: int, itemsize: int, out: memoryview, where: str) -> None:
    """Decode frame ``i`` (its ``stored`` bytes) into ``out`` (exactly its raw size).

    A frame that does not decode to exactly ``len(out)`` bytes (a plane table that does not
    add up, a zstd frame that does not decompress to its plane) raises CorruptChunkError
    naming ``where``."""
    import numpy as np

    if len(stored) == len(out):  # stored raw
        out[:] = stored
        return
    elements = np.frombuffer(out, dtype=np.uint8).reshape(-1, itemsize)
    if codec.transform == BYTEPLANES:
        n, head = len(out) // itemsize, 4 * itemsize
        table = np.frombuffer(stored[:head], dtype="<u4").tolist() if len(stored) >= head else []
        if len(table) != itemsize or not all(0 < s <= n for s in table) or head + sum(table) != len(stored):
            raise CorruptChunkError(f"{where}: frame {i}: plane table {table} does not add up to {len(stored)} "
                                    f"stored bytes of {itemsize} planes of {n}")
        at = head
        for j, size in enumerate(table):  # plane by plane: long strided runs (a k-wide inner loop is ~8x slower)
            piece = stored[at : at + size]
            elements[:, j] = np.frombuffer(piece if size == n else _inflate(piece, n, f"{where}: frame {i} plane {j}"),
                                           dtype=np.uint8)
            at += size
        return
    data = _inflate(stored, len(out), f"{where}: frame {i}")
    if codec.transform == BYTEGROUP:  # written by ckpt before byteplanes: one zstd frame of all planes
        planes = np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1)
        for j in range(itemsize):
            elements[:, j] = planes[j]
    else:
        out[:] = data


def _inflate(stored: memoryview, size: int, where: str) -> bytes:
    """One zstd frame that decompresses to exactly ``size`` bytes."""
    import zstandard

    try:
        data = _decompressor().decompress(stored, max_output_size=size)
    except zstandard.ZstdError as e:
        raise CorruptChunkError(f"{where} does not decompress ({e})") from None
    if len(data) != size:
        raise CorruptChunkError(f"{where} decompresses to {len(data)} bytes, not {size}")
    return data
