"""Executing a read plan: fetch each coalesced read, verify its checksum blocks, copy into targets.

Where the bytes are touched decides the speed (a 2-core box moves ~5 GiB/s
through DRAM per core, and a freshly allocated buffer costs a page fault per
4 KiB), so each byte is brought into cache once and used while it is there:

* local file, whole chunk ("direct"): read straight into the target in small
  pieces, each hashed right after it lands, while it is still in cache;
* local file, partial chunk (resharding): hashed in place in a page-cache
  mapping (no read copy, no scratch buffer), and the target rows a block holds
  are copied out as soon as that block is verified;
* other backends: one request per coalesced read into a per-thread scratch
  arena reused from read to read, then verified and copied out.

Gap segments (read-through between coalesced ranges) cost nothing locally:
a local file is not read through its gaps. Compressed chunks: each stored
frame is verified against its checksum (of the stored bytes) before it is
decompressed into a per-thread arena, out of which the rows are copied.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch

from .codec import decode_frame
from .describe import TensorEntry, local_view
from .errors import (
    CheckpointError,
    CheckpointFormatError,
    CorruptChunkError,
    MissingObjectError,
    StorageOperationError,
    TruncatedObjectError,
)
from .format import Chunk, Manifest
from .framing import as_bytes, block_hasher, checksum
from .readplan import Need, Read, Segment
from .regions import Box, row_major_strides, span_view
from .storage import Storage

PIECE_BYTES = 1 << 20  # read-then-hash granularity for direct reads: stays in L2


def target_view(entry: TensorEntry, piece: int, box: Box) -> torch.Tensor:
    """The part of target ``entry``'s local piece ``piece`` that holds global ``box``."""
    p = entry.pieces[piece]
    return local_view(entry.local.detach(), p)[box.relative_to(p.box).slices()]


# zstd decodes at most 128 KiB (one RLE block) from a 4-byte block: no chunk decodes to more than this
# many times its stored bytes.
MAX_RATIO = 1 << 15


def check_holds(storage: Storage, chunks: Iterable[Chunk], sizes: dict[str, int]) -> None:
    """Refuse chunks whose bytes their objects do not really hold, before anything is allocated for
    them: a manifest's claims (shapes, object sizes) never decide alone how much memory a reader
    takes; a compressed chunk may claim at most what its stored bytes can decode to (``MAX_RATIO``).
    ``storage`` reads the manifest's references; ``sizes`` caches real sizes across calls."""
    for c in chunks:
        if c.object not in sizes:
            where = storage.uri_of(c.object)
            try:
                sizes[c.object] = storage.size(c.object)
            except FileNotFoundError:
                raise MissingObjectError(
                    f"{where}: bytes [{c.offset}, {c.offset + c.stored}) of chunk {c.box} requested, "
                    "but the object is gone (deleted while the checkpoint was read, or never written)"
                ) from None
            except CheckpointError:
                raise
            except OSError as e:
                raise StorageOperationError(f"{where}: size failed: {e}", "size", where) from e
        if c.codec is not None and c.length > c.stored * MAX_RATIO:
            raise CheckpointFormatError(
                f"{storage.uri_of(c.object)}: chunk {c.box} claims {c.length} bytes from {c.stored} compressed "
                f"bytes, more than zstd can decode them to"
            )
        if c.offset + c.stored > sizes[c.object]:
            raise TruncatedObjectError(
                f"{storage.uri_of(c.object)}: bytes [{c.offset}, {c.offset + c.stored}) of chunk {c.box} "
                f"requested, object ends at {sizes[c.object]}"
            )


class Fetcher:
    """Runs one :class:`~ckpt.readplan.Read` at a time; safe to call from several threads."""

    def __init__(self, storage: Storage, manifest: Manifest, targets: dict[str, TensorEntry], verify: bool) -> None:
        self.storage, self.manifest, self.targets, self.verify = storage, manifest, targets, verify
        self.local = storage.supports_mapping  # local files: read in small pieces, map partial chunks
        self._tls = threading.local()

    def __call__(self, read: Read) -> None:
        """Run ``read``; every failure is a CheckpointError naming the object and the byte range."""
        try:
            self._run(read)
        except CheckpointError:
            raise
        except FileNotFoundError:
            raise MissingObjectError(
                f"{self.storage.uri_of(read.object)}: bytes [{read.start}, {read.stop}) requested, "
                "but the object is gone (deleted while the checkpoint was read, or never written)"
            ) from None
        except OSError as e:
            where = self.storage.uri_of(read.object)
            raise StorageOperationError(
                f"{where}: reading bytes [{read.start}, {read.stop}) failed: {e}", "read", where
            ) from e

    def _run(self, read: Read) -> None:
        if not self.local:
            self._remote(read)
            return
        view = None  # one mapping per read: mapping and unmapping cost TLB shootdowns across threads
        for seg in read.segments:
            if seg.direct is not None and not seg.encoded:
                self._direct(read.object, seg, seg.direct)
            elif seg.needs or seg.direct is not None:
                if view is None:
                    view = self.storage.map_range(read.object, read.start, read.stop)
                    assert view is not None
                part = view[seg.start - read.start : seg.stop - read.start]
                if seg.encoded:
                    self._decode(read.object, seg, part)
                else:
                    self._mapped(read.object, seg, part)

    # -- local files -------------------------------------------------------------------------------

    def _direct(self, obj: str, seg: Segment, n: Need) -> None:
        dst = as_bytes(target_view(self.targets[n.key], n.piece, n.chunk.box))
        if not self.verify:
            self.storage.read_into_many(obj, seg.start, [dst])
            return
        for lo, hi, chunk, b in self._blocks(seg):
            h = block_hasher()
            for p in range(lo, hi, PIECE_BYTES):
                q = min(p + PIECE_BYTES, hi)
                piece = dst[p - seg.start : q - seg.start]
                self.storage.read_into_many(obj, p, [piece])
                h.update(piece)
            self._check(obj, chunk, b, lo, hi, h.hexdigest())

    def _mapped(self, obj: str, seg: Segment, view: memoryview) -> None:
        buf = torch.frombuffer(view, dtype=torch.uint8)  # a segment with needs is never empty
        rows = [_Rows(self._source(seg, buf, n), self._dest(n), n) for n in seg.needs]
        if not self.verify:
            for r in rows:
                r.upto(seg.stop)
            return
        verified = seg.start
        for lo, hi, chunk, b in self._blocks(seg):
            self._check(obj, chunk, b, lo, hi, checksum(view[lo - seg.start : hi - seg.start]))
            if lo <= verified:
                verified = max(verified, hi)
                for r in rows:
                    r.upto(verified)
        for r in rows:
            if not r.complete:
                raise AssertionError(f"{obj}: {r.need.key}: read plan left rows unverified (internal error)")

    # -- other backends ----------------------------------------------------------------------------

    def _remote(self, read: Read) -> None:
        bufs: list[torch.Tensor] = []
        scratch = self._scratch(
            sum(_aligned(s.stop - s.start) for s in read.segments if s.direct is None or s.encoded)
        )
        at = 0
        for seg in read.segments:
            if seg.direct is not None and not seg.encoded:
                n = seg.direct
                bufs.append(target_view(self.targets[n.key], n.piece, n.chunk.box))
            else:
                bufs.append(scratch[at : at + seg.stop - seg.start])
                at += _aligned(seg.stop - seg.start)
        self.storage.read_into_many(read.object, read.start, [as_bytes(b) for b in bufs])
        for seg, buf in zip(read.segments, bufs):
            if seg.encoded:
                self._decode(read.object, seg, as_bytes(buf))
                continue
            if self.verify:
                raw = as_bytes(buf)
                for lo, hi, chunk, b in self._blocks(seg):
                    self._check(read.object, chunk, b, lo, hi, checksum(raw[lo - seg.start : hi - seg.start]))
            for n in seg.needs:
                _Rows(self._source(seg, buf, n), self._dest(n), n).upto(seg.stop)

    def _scratch(self, nbytes: int, name: str = "arena") -> torch.Tensor:
        """This thread's scratch arena ``name``, grown to ``nbytes`` and reused across reads."""
        arena = getattr(self._tls, name, None)
        if arena is None or arena.numel() < nbytes:
            arena = torch.empty(nbytes, dtype=torch.uint8)
            setattr(self._tls, name, arena)
        return arena

    # -- compressed chunks -------------------------------------------------------------------------

    def _decode(self, obj: str, seg: Segment, stored: memoryview) -> None:
        """Verify and decompress the segment's frames (consecutive frames of one chunk): straight
        into the target for a direct one, else into an arena that each need is copied out of."""
        frames = sorted(seg.blocks)
        chunk = seg.blocks[frames[0]]
        codec, B = chunk.codec, self.manifest.block_bytes
        assert codec is not None
        first, last = frames[0][1], frames[-1][1] + 1
        lo, hi = first * B, min(last * B, chunk.length)
        n = seg.direct
        raw = self._scratch(hi - lo, "decoded")[: hi - lo] if n is None else None
        out = as_bytes(raw) if n is None else as_bytes(target_view(self.targets[n.key], n.piece, chunk.box))
        size = self.manifest.tensors[(n or seg.needs[0]).key].itemsize
        at = chunk.offset + codec.frame_start(first)
        for f in range(first, last):
            s0, s1 = at - seg.start, at - seg.start + codec.frames[f]
            piece = stored[s0:s1]
            if self.verify:
                self._check(obj, chunk, f, at, at + codec.frames[f], checksum(piece))
            where = f"{self.storage.uri_of(obj)}: bytes [{at}, {at + codec.frames[f]}) of chunk {chunk.box}"
            decode_frame(piece, codec, f, size, out[f * B - lo : min((f + 1) * B, chunk.length) - lo], where)
            at += codec.frames[f]
        if raw is None:
            return
        decoded = Segment(chunk.offset + lo, chunk.offset + hi)
        for need in seg.needs:
            _Rows(self._source(decoded, raw, need), self._dest(need), need).upto(decoded.stop)

    # -- shared ------------------------------------------------------------------------------------

    def _blocks(self, seg: Segment) -> list[tuple[int, int, Chunk, int]]:
        """(start, stop, chunk, index) of each checksum block to verify, in object order."""
        B = self.manifest.block_bytes
        out = []
        for (_, b, _), chunk in seg.blocks.items():
            lo = chunk.offset + b * B
            out.append((lo, min(lo + B, chunk.offset + chunk.length), chunk, b))
        out.sort(key=lambda x: x[0])
        return out

    def _check(self, obj: str, chunk: Chunk, b: int, lo: int, hi: int, digest: str) -> None:
        if digest != chunk.checksums[b]:
            tensors = self.manifest.tensors
            key = next((k for k in self.targets if k in tensors and chunk in tensors[k].chunks_in(chunk.box)), "?")
            raise CorruptChunkError(
                f"{self.storage.uri_of(obj)}: bytes [{lo}, {hi}) of {key} chunk {chunk.box} "
                f"do not match their checksum (block {b})"
            )

    def _source(self, seg: Segment, buf: torch.Tensor, n: Need) -> torch.Tensor:
        """``n.span.box`` as a strided view of the segment's bytes, in the stored dtype."""
        raw = buf[n.byte_start - seg.start : n.byte_stop - seg.start]
        if raw.data_ptr() % n.itemsize or raw.storage_offset() % n.itemsize:
            raw = raw.clone()
        src = raw.view(self.manifest.tensors[n.key].dtype)
        sizes, strides, offset = span_view(n.chunk.box, n.span)
        return torch.as_strided(src, sizes, strides, src.storage_offset() + offset)

    def _dest(self, n: Need) -> torch.Tensor:
        return target_view(self.targets[n.key], n.piece, n.span.box)


class _Rows:
    """Copies one need into its target row by row (along the span box's outermost
    dimension of size > 1), each row once the bytes up to its last one are verified."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, need: Need) -> None:
        self.src, self.dst, self.need = src, dst, need
        sizes = need.span.box.sizes
        self.dim = next((d for d, s in enumerate(sizes) if s > 1), None)
        self.rows = sizes[self.dim] if self.dim is not None else 1
        strides = row_major_strides(need.chunk.box.sizes)
        rel = need.span.box.relative_to(need.chunk.box).offsets
        first = sum(o * s for o, s in zip(rel, strides))
        inner = range(self.dim + 1, len(sizes)) if self.dim is not None else range(0)
        extent = 1 + sum((sizes[d] - 1) * strides[d] for d in inner)
        size = need.itemsize
        self.first_end = need.chunk.offset + (first + extent) * size  # end byte of row 0
        self.step = strides[self.dim] * size if self.dim is not None else 0
        # Row by row only into host memory; a device target gets one copy when all is verified.
        self.progressive = dst.device.type == "cpu"
        self.done = 0

    @property
    def complete(self) -> bool:
        return self.done == self.rows

    def upto(self, verified: int) -> None:
        """Copy the rows whose bytes all lie below object offset ``verified``."""
        if self.done == self.rows or verified < self.first_end:
            return
        ready = self.rows if self.step == 0 else min(self.rows, (verified - self.first_end) // self.step + 1)
        if ready < self.rows and not self.progressive:
            return
        if ready <= self.done:
            return
        if self.dim is None or (self.done == 0 and ready == self.rows):
            self.dst.copy_(self.src)
        else:
            k, i, m = self.dim, self.done, ready - self.done
            self.dst.narrow(k, i, m).copy_(self.src.narrow(k, i, m))
        self.done = ready


def _aligned(n: int) -> int:
    """Scratch slices start on a cache line (and so on any element size)."""
    return -(-n // 64) * 64
