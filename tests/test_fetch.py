"""The read executor (ckpt/fetch.py) on its three paths: whole chunks read into the target
piece by piece and hashed as they land, partial chunks hashed and copied out of a page-cache
mapping row by row as blocks verify, and remote backends through a reused scratch arena."""

from __future__ import annotations

import re
import uuid

import fsspec
import pytest
import torch
from damage import flip_bits
from helpers import bits, manifest_of, random_tensor

import ckpt
from ckpt import CorruptChunkError, LoadOptions, SaveOptions, Sharded
from ckpt.fetch import PIECE_BYTES


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("threads", [1, 3])
def test_column_shards_across_block_boundaries_are_bitwise(any_uri, verify, threads):
    uri = any_uri
    # rows of 7 * 4 = 28 bytes against 64-byte blocks: most rows straddle a block edge,
    # so a row may only be copied once the block holding its end is verified
    full = random_tensor((90, 7), torch.float32, 1)
    ckpt.save({"w": full}, uri, options=SaveOptions(chunk_bytes=600, block_bytes=64))
    for lo, hi in [(0, 3), (3, 7), (2, 5), (6, 7)]:
        local = torch.full((90, hi - lo), -1.0)
        opts = LoadOptions(verify=verify, io_threads=threads, max_gap_bytes=64)
        ckpt.load({"w": Sharded.box(local, full.shape, (0, lo))}, uri, options=opts)
        assert torch.equal(bits(local), bits(full[:, lo:hi]))


def test_bf16_and_3d_boxes_through_the_mapping(tmp_path):
    full = random_tensor((5, 33, 12), torch.bfloat16, 2)
    path = str(tmp_path / "c")
    ckpt.save({"w": full}, path, options=SaveOptions(chunk_bytes=1 << 10, block_bytes=128))
    for offs, sizes in [((0, 0, 5), (5, 33, 4)), ((1, 7, 0), (3, 20, 12)), ((4, 32, 11), (1, 1, 1))]:
        local = torch.zeros(sizes, dtype=torch.bfloat16)
        ckpt.load({"w": Sharded.box(local, full.shape, offs)}, path)
        want = full[tuple(slice(o, o + s) for o, s in zip(offs, sizes))]
        assert torch.equal(bits(local), bits(want))


def test_flip_in_a_partially_read_chunk_names_object_key_and_block(any_uri):
    uri = any_uri
    full = random_tensor((64, 16), torch.float32, 3)
    B = 256
    ckpt.save({"w": full}, uri, options=SaveOptions(chunk_bytes=1 << 20, block_bytes=B))
    (chunk,) = manifest_of(uri).tensors["w"].chunks
    at = chunk.offset + 40 * 64 + 4 * 9  # row 40, column 9
    flip_bits(f"{uri}/{chunk.object}", at, 0x01)
    local = torch.zeros(64, 8)
    with pytest.raises(CorruptChunkError) as ei:
        ckpt.load({"w": Sharded.box(local, full.shape, (0, 8))}, uri)
    msg = str(ei.value)
    lo, hi = map(int, re.search(r"bytes \[(\d+), (\d+)\)", msg).groups())
    assert chunk.object in msg and " w chunk " in msg and lo <= at < hi and hi - lo == B, msg
    if uri.startswith("memory://"):
        return  # remote reads verify a whole request before copying anything
    # local: rows are copied as their blocks verify, so those before the damage are the stored ones
    done = (lo - chunk.offset) // 64
    assert done > 0 and torch.equal(bits(local[:done]), bits(full[:done, 8:]))
    # and no unverified byte (the damaged row included) reached the target
    assert not bits(local[done:]).any()


def test_direct_read_hashes_blocks_that_span_several_pieces(tmp_path):
    # blocks of 1.5 pieces: a block's digest is streamed across piece reads
    B = PIECE_BYTES * 3 // 2
    full = random_tensor((5 * PIECE_BYTES // 4,), torch.float32, 4)  # 5 pieces, 3.33 blocks
    path = str(tmp_path / "c")
    ckpt.save({"w": full}, path, options=SaveOptions(chunk_bytes=64 << 20, block_bytes=B))
    out = torch.zeros_like(full)
    ckpt.load({"w": out}, path)
    assert torch.equal(bits(out), bits(full))
    (chunk,) = manifest_of(path).tensors["w"].chunks
    at = chunk.offset + B + PIECE_BYTES  # second block, in its second piece
    flip_bits(f"{path}/{chunk.object}", at, 0x01)
    with pytest.raises(CorruptChunkError, match=rf"bytes \[{chunk.offset + B}, {chunk.offset + 2 * B}\)"):
        ckpt.load({"w": torch.zeros_like(full)}, path)
    out = torch.zeros_like(full)
    ckpt.load({"w": out}, path, options=LoadOptions(verify=False))
    assert (bits(out) != bits(full)).sum() == 1


def test_scratch_arena_is_reused_across_reads_of_different_sizes():
    uri = f"memory://ckpt-fetch-tests/{uuid.uuid4().hex}/c"
    src = {f"t{i}": random_tensor((3 + 5 * i, 11), torch.float32, 10 + i) for i in range(6)}
    ckpt.save(src, uri, options=SaveOptions(chunk_bytes=300, block_bytes=64))
    dst = {k: Sharded.box(torch.zeros(v.shape[0], 4), v.shape, (0, 5)) for k, v in src.items()}
    ckpt.load(dst, uri, options=LoadOptions(io_threads=1, max_read_bytes=700))
    for k, v in src.items():
        assert torch.equal(bits(dst[k].tensor), bits(v[:, 5:9])), k
    fsspec.filesystem("memory").rm(uri.split("://", 1)[1].rsplit("/", 1)[0], recursive=True)
