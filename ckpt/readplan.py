"""Load planning: which byte ranges of which objects serve which target pieces.

Pure: it sees manifest records and target boxes, never storage or tensors.
Per (stored chunk, target piece) it computes the element spans that cover the
intersection, widens them to whole checksum blocks (so every byte used is
verified), and coalesces neighbouring ranges of one object into few reads.
A span that is exactly a whole chunk may be read straight into the target's
memory ("direct"); the rest goes through scratch buffers. A compressed chunk
(``chunk.codec``) is read by whole frames (a frame is a checksum block): its
segment spans the stored bytes of the frames the span touches, and is decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import CheckpointFormatError
from .format import Chunk
from .regions import Box, Span, read_spans


@dataclass(frozen=True)
class Need:
    """Elements ``span`` of stored ``chunk`` go to target piece ``piece`` of ``key``."""

    key: str
    piece: int
    chunk: Chunk
    itemsize: int
    span: Span

    @property
    def byte_start(self) -> int:
        """Absolute offset in the object of the span's first byte."""
        return self.chunk.offset + self.span.start * self.itemsize

    @property
    def byte_stop(self) -> int:
        return self.chunk.offset + self.span.stop * self.itemsize


@dataclass
class Segment:
    """Bytes [start, stop) of one object, landing either in the target (direct)
    or in a scratch buffer that ``needs`` copy out of."""

    start: int
    stop: int
    direct: Need | None = None
    needs: list[Need] = field(default_factory=list)
    # blocks to verify, keyed by (chunk offset in the object, block index, chunk identity: two
    # records naming one offset are each checked against their own checksums); of an encoded
    # segment: the frames to verify and decode, always (they are decoded even unverified)
    blocks: dict[tuple[int, int, int], Chunk] = field(default_factory=dict)
    encoded: bool = False  # stored bytes of consecutive frames of one compressed chunk


@dataclass
class Read:
    """One request: a contiguous range of one object, split into segments."""

    object: str
    segments: list[Segment]

    @property
    def start(self) -> int:
        return self.segments[0].start

    @property
    def stop(self) -> int:
        return self.segments[-1].stop


@dataclass(frozen=True)
class ReadSettings:
    block_bytes: int
    verify: bool = True
    max_gap_bytes: int = 1 << 20  # read through gaps up to this size instead of splitting
    max_read_bytes: int = 64 << 20  # cap on one coalesced request


def intersect_chunks(
    key: str, piece: int, box: Box, chunks: list[Chunk], itemsize: int, max_gap_bytes: int
) -> tuple[list[Need], int]:
    """Needs for one target box and the number of its elements they cover."""
    needs, covered = [], 0
    for c in chunks:
        inter = c.box.intersect(box)
        if inter is None:
            continue
        covered += inter.numel
        if inter == c.box:  # the whole chunk (the common case): one span, no geometry
            needs.append(Need(key, piece, c, itemsize, Span(0, inter.numel, inter)))
            continue
        for span in read_spans(c.box, inter, max(0, max_gap_bytes // itemsize)):
            needs.append(Need(key, piece, c, itemsize, span))
    return needs, covered


def plan_reads(needs: list[Need], settings: ReadSettings, direct_ok: Callable[[Need], bool]) -> list[Read]:
    """Group needs into coalesced reads, one list per object, in offset order."""
    B = settings.block_bytes
    by_object: dict[str, list[Segment]] = {}
    for n in needs:
        codec = n.chunk.codec
        whole = n.span.start == 0 and n.span.stop * n.itemsize == n.chunk.length
        if codec is not None:
            first = n.span.start * n.itemsize // B
            last = -(-n.span.stop * n.itemsize // B)
            start = n.chunk.offset + codec.frame_start(first)
            stop = start + sum(codec.frames[first:last])
            # a whole chunk into a contiguous target of its dtype: decoded straight into place
            seg = Segment(start, stop, direct=n, encoded=True) if whole and direct_ok(n) else Segment(
                start, stop, needs=[n], encoded=True
            )
            seg.blocks = {(n.chunk.offset, f, id(n.chunk)): n.chunk for f in range(first, last)}
            by_object.setdefault(n.chunk.object, []).append(seg)
            continue
        if whole and direct_ok(n):
            seg = Segment(n.chunk.offset, n.chunk.offset + n.chunk.length, direct=n)
        else:
            lo = n.span.start * n.itemsize
            hi = n.span.stop * n.itemsize
            if settings.verify:
                lo = lo // B * B
                hi = min(-(-hi // B) * B, n.chunk.length)
            seg = Segment(n.chunk.offset + lo, n.chunk.offset + hi, needs=[n])
        if settings.verify:
            first = (seg.start - n.chunk.offset) // B
            last = -(-(seg.stop - n.chunk.offset) // B)
            seg.blocks = {(n.chunk.offset, b, id(n.chunk)): n.chunk for b in range(first, last)}
        by_object.setdefault(n.chunk.object, []).append(seg)

    reads = []
    for obj, segs in sorted(by_object.items()):
        merged = _merge_overlaps(obj, segs)
        reads.extend(_coalesce(obj, merged, settings))
    return reads


def _merge_overlaps(obj: str, segs: list[Segment]) -> list[Segment]:
    """Union overlapping segments; a direct one that overlaps another becomes scratch.

    Compressed bytes are decoded frame by frame as one chunk's, so a compressed chunk whose
    bytes overlap another chunk's is refused: no writer stores that, and decoding one chunk's
    frames as another's would hand verified bytes to the wrong tensor."""
    segs.sort(key=lambda s: (s.start, s.stop))
    out: list[Segment] = []
    for s in segs:
        if out and s.start < out[-1].stop:
            prev = out[-1]
            if prev.encoded or s.encoded:
                spans = {(c.offset, c.offset + c.stored) for c in (*prev.blocks.values(), *s.blocks.values())}
                if len(spans) > 1:
                    (a0, a1), (b0, b1) = sorted(spans)[:2]
                    raise CheckpointFormatError(
                        f"{obj}: chunks stored at bytes [{a0}, {a1}) and [{b0}, {b1}) overlap and one is "
                        "compressed: the manifest is damaged"
                    )
            for seg in (prev, s):
                if seg.direct is not None:
                    seg.needs.append(seg.direct)
                    seg.direct = None
            prev.stop = max(prev.stop, s.stop)
            prev.encoded = prev.encoded or s.encoded
            prev.needs.extend(s.needs)
            prev.blocks.update(s.blocks)
        else:
            out.append(s)
    return out


def _coalesce(obj: str, segs: list[Segment], settings: ReadSettings) -> list[Read]:
    reads: list[Read] = []
    for s in segs:
        cur = reads[-1] if reads else None
        if (
            cur is not None
            and s.start - cur.stop <= settings.max_gap_bytes
            and s.stop - cur.start <= settings.max_read_bytes
        ):
            if s.start > cur.stop:
                cur.segments.append(Segment(cur.stop, s.start))  # gap: read and discard
            cur.segments.append(s)
        else:
            reads.append(Read(obj, [s]))
    return reads
