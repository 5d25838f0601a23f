"""Read planning (pure): every chunk record is verified against its own checksums, whatever
other records claim the same bytes."""

from __future__ import annotations

import pytest

from ckpt.codec import Codec
from ckpt.errors import CheckpointFormatError
from ckpt.format import Chunk
from ckpt.readplan import Need, ReadSettings, plan_reads
from ckpt.regions import Box, Span

B = 64
OBJ = "data/x.safetensors"


def _need(key: str, offset: int, n: int, checksum: str, codec: Codec | None = None) -> Need:
    box = Box((0,), (n,))
    blocks = -(-4 * n // B)
    chunk = Chunk(box, OBJ, offset, 4 * n, tuple(f"{checksum}{i}" for i in range(blocks)), codec)
    return Need(key, 0, chunk, 4, Span(0, n, box))


def _checked(reads) -> set[tuple[str, int]]:
    """(expected checksum, block) of every block the plan verifies."""
    return {(c.checksums[b], b) for r in reads for s in r.segments for (_, b, _), c in s.blocks.items()}


def test_two_records_at_one_offset_are_each_checked_against_their_own_checksums():
    a, s = _need("a", 100, 32, "a"), _need("s", 100, 2, "s")  # s claims a's first bytes
    reads = plan_reads([a, s], ReadSettings(B), direct_ok=lambda n: True)
    assert {("a0", 0), ("a1", 1), ("s0", 0)} <= _checked(reads)


def test_a_compressed_chunk_overlapping_another_chunk_is_refused_naming_both_ranges():
    codec = Codec("zstd", "bytegroup", B, (40, 40))
    packed, plain = _need("p", 100, 32, "p", codec), _need("q", 120, 8, "q")
    with pytest.raises(CheckpointFormatError, match=r"data/x\.safetensors.*\[100, 180\).*\[120, 152\)"):
        plan_reads([packed, plain], ReadSettings(B), direct_ok=lambda n: True)


def test_one_compressed_chunk_needed_by_two_pieces_is_planned():
    codec = Codec("zstd", "bytegroup", B, (40, 40))
    one, two = _need("p", 100, 32, "p", codec), _need("p", 100, 32, "p", codec)
    (read,) = plan_reads([one, two], ReadSettings(B), direct_ok=lambda n: False)
    assert [(s.start, s.stop) for s in read.segments] == [(100, 180)]
