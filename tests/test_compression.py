"""Compressed chunks (byte grouping + zstd frames): bitwise round trips, ranged reads that fetch only
the frames they need, corruption named by object and byte range, and what a reader refuses."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

import ckpt
from ckpt.errors import CheckpointFormatError, CorruptChunkError
from ckpt.options import Compression, SaveOptions
from ckpt.reader import CheckpointReader
from ckpt.regions import Box
from ckpt.storage.local import LocalStorage
from tests.damage import flip_bits
from tests.helpers import edit_manifest

BLOCK = 4096


def _weights(dtype: torch.dtype, shape=(96, 200), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def _state() -> dict:
    return {
        "bf16": _weights(torch.bfloat16),
        "fp16": _weights(torch.float16),
        "fp32": _weights(torch.float32),
        "fp64": _weights(torch.float64, (7, 300)),
        "ints": torch.arange(5000, dtype=torch.int64),
        "bytes": torch.randint(0, 4, (3000,), dtype=torch.uint8),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5),
        "lr": 0.1,
    }


def _save(state: dict, uri: str, block_bytes: int = BLOCK, **compression) -> ckpt.format.Manifest:
    ckpt.save(state, uri, options=SaveOptions(block_bytes=block_bytes, compression=Compression(**compression)))
    return CheckpointReader(uri).manifest


def test_round_trip_is_bitwise_and_floats_are_stored_compressed(tmp_path):
    state = _state()
    m = _save(state, str(tmp_path / "c"))
    by_key = {k: r.chunks for k, r in m.tensors.items()}
    for key in ("bf16", "fp16", "fp32", "fp64"):
        (c,) = by_key[key]
        assert c.codec is not None and c.codec.transform == "byteplanes", key
        assert c.stored < c.length and len(c.codec.frames) == len(c.checksums) == -(-c.length // BLOCK)
    assert all(c.codec is None for key in ("ints", "bytes", "empty", "scalar") for c in by_key[key])
    out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in state.items()}
    ckpt.load(out, str(tmp_path / "c"))
    for k, v in state.items():
        assert torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v, k


def test_bf16_weights_shrink_more_with_byte_grouping(tmp_path):
    # zstd's entropy tables pay off over large frames: 1 MiB frames here (default 4 MiB)
    state = {"w": _weights(torch.bfloat16, (1024, 1024))}
    grouped = _save(state, str(tmp_path / "g"), 1 << 20).tensors["w"].chunks[0]
    plain = _save(state, str(tmp_path / "p"), 1 << 20, byte_group=False).tensors["w"].chunks[0]
    assert plain.codec is not None and plain.codec.transform is None
    assert grouped.length / grouped.stored > 1.4 > plain.length / plain.stored


def test_only_the_dtypes_named_are_compressed(tmp_path):
    m = _save(_state(), str(tmp_path / "c"), dtypes=(torch.bfloat16,))
    assert m.tensors["bf16"].chunks[0].codec is not None
    assert all(r.chunks[0].codec is None for k, r in m.tensors.items() if k != "bf16")


@pytest.mark.parametrize("header_last", [True, False])
def test_incompressible_chunks_are_stored_raw(tmp_path, monkeypatch, header_last):
    # where the header is written last (local files) frames stream out as they are compressed, so an
    # incompressible chunk keeps its codec with every frame stored raw; elsewhere it loses its codec
    monkeypatch.setattr("ckpt.engine._seekable", lambda f: header_last)
    noise = torch.randint(-(2**31), 2**31 - 1, (64, 256), dtype=torch.int32).view(torch.float32)
    m = _save({"noise": noise}, str(tmp_path / "c"))
    (c,) = m.tensors["noise"].chunks
    if header_last:
        assert c.codec is not None and c.codec.frames == (BLOCK,) * 16 and c.stored == c.length
    else:
        assert c.codec is None
    out = {"noise": torch.zeros_like(noise)}
    ckpt.load(out, str(tmp_path / "c"))
    assert torch.equal(out["noise"].view(torch.int32), noise.view(torch.int32))


def test_a_ranged_read_fetches_and_decodes_only_the_frames_it_needs(tmp_path, monkeypatch):
    w = _weights(torch.float32, (256, 256))  # 64 rows per 64 KiB... 16 rows per 16 KiB frame
    ckpt.save({"w": w}, str(tmp_path / "c"), options=SaveOptions(block_bytes=16384, compression=Compression()))
    reader = CheckpointReader(str(tmp_path / "c"))
    (c,) = reader.manifest.tensors["w"].chunks
    assert len(c.codec.frames) == 16
    mapped: list[tuple[int, int]] = []
    original = LocalStorage.map_range

    def spy(self, rel, start, stop):
        mapped.append((start, stop))
        return original(self, rel, start, stop)

    monkeypatch.setattr(LocalStorage, "map_range", spy)
    got = reader.read("w", Box((40, 10), (30, 100)))  # rows 40..69: frames 2, 3, 4 (16 rows each)
    assert torch.equal(got, w[40:70, 10:110])
    start = c.offset + c.codec.frame_start(2)
    assert mapped == [(start, start + sum(c.codec.frames[2:5]))]


def test_ranged_reads_from_a_remote_backend(tmp_path):
    uri = f"memory://comp-{uuid.uuid4().hex}/c"
    w = _weights(torch.bfloat16, (128, 96))
    ckpt.save({"w": w}, uri, options=SaveOptions(block_bytes=1024, compression=Compression()))
    reader = CheckpointReader(uri)
    assert reader.manifest.tensors["w"].chunks[0].codec is not None
    assert torch.equal(reader.read("w", Box((3, 5), (77, 40))), w[3:80, 5:45])
    assert torch.equal(reader.read("w"), w)


def test_a_damaged_frame_is_named_by_object_byte_range_and_key(tmp_path):
    uri = str(tmp_path / "c")
    w = _weights(torch.bfloat16, (256, 128))
    m = _save({"w": w}, uri)
    (c,) = m.tensors["w"].chunks
    at = c.offset + c.codec.frame_start(3) + 5
    path = os.path.join(uri, c.object)
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptChunkError) as e:
        ckpt.load({"w": torch.zeros_like(w)}, uri)
    lo = c.offset + c.codec.frame_start(3)
    message = str(e.value)
    assert c.object in message and f"[{lo}, {lo + c.codec.frames[3]})" in message and "w chunk" in message
    (failure,) = CheckpointReader(uri).verify()
    assert "block 3" in failure
    # the frames before it still read (a ranged read never touches frame 3)
    assert torch.equal(CheckpointReader(uri).read("w", Box((0, 0), (16, 128))), w[:16])


def test_async_save_compresses_too(tmp_path):
    state = {"w": _weights(torch.bfloat16, (64, 64)), "step": torch.tensor(3)}
    h = ckpt.async_save(state, str(tmp_path / "c"), options=SaveOptions(compression=Compression(level=3)))
    h.wait()
    out = {"w": torch.zeros(64, 64, dtype=torch.bfloat16), "step": torch.tensor(0)}
    ckpt.load(out, str(tmp_path / "c"))
    assert torch.equal(out["w"], state["w"]) and out["step"].item() == 3


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda codec: codec.update(name="lz4"), "unknown codec"),
        (lambda codec: codec.update(transform="shuffle"), "unknown transform"),
        (lambda codec: codec.update(frame_bytes=codec["frame_bytes"] * 2), "frame_bytes"),
        (lambda codec: codec["frames"].pop(), "frames for"),
        (lambda codec: codec["frames"].__setitem__(0, BLOCK + 1), "stores"),
    ],
)
def test_a_reader_refuses_a_codec_it_cannot_follow(tmp_path, change, problem):
    uri = str(tmp_path / "c")
    _save({"w": _weights(torch.bfloat16, (64, 128))}, uri)
    edit_manifest(uri, lambda doc: change(doc["tensors"]["w"]["chunks"][0]["codec"]))
    with pytest.raises(CheckpointFormatError, match=problem):
        CheckpointReader(uri)


def test_a_header_written_last_leaves_a_safetensors_file_whose_entries_are_the_stored_frames(tmp_path):
    from safetensors import safe_open

    uri = str(tmp_path / "c")
    state = {"w": _weights(torch.bfloat16, (256, 128)), "ints": torch.arange(5000, dtype=torch.int64)}
    m = _save(state, uri)
    w, ints = m.tensors["w"].chunks[0], m.tensors["ints"].chunks[0]
    assert w.codec is not None and w.stored < w.length and ints.codec is None
    path = os.path.join(uri, w.object)
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) == w.offset + w.stored  # the reserved header is padded, not followed by a gap
    with safe_open(path, "pt") as f:
        assert torch.equal(f.get_tensor("ints@0"), state["ints"])
        assert f.get_tensor("w@0,0").numpy().tobytes() == data[w.offset : w.offset + w.stored]


def test_an_object_store_that_cannot_seek_gets_the_header_first_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr("ckpt.engine._seekable", lambda f: False)
    state = _state()
    m = _save(state, str(tmp_path / "c"))
    assert all(m.tensors[k].chunks[0].codec is not None for k in ("bf16", "fp16", "fp32", "fp64"))
    out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in state.items()}
    ckpt.load(out, str(tmp_path / "c"))
    for k, v in state.items():
        assert torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v, k


def test_a_compressor_failing_mid_save_leaves_no_object_and_no_checkpoint(tmp_path, monkeypatch):
    from ckpt import codec

    calls = []
    original = codec.encode_frame

    def failing(raw, *args):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("compressor out of memory")
        return original(raw, *args)

    monkeypatch.setattr(codec, "encode_frame", failing)
    uri = str(tmp_path / "c")
    with pytest.raises(Exception, match="compressor out of memory"):
        _save({"w": _weights(torch.bfloat16, (256, 128))}, uri)
    assert not os.path.exists(os.path.join(uri, "manifest.json"))
    data = os.path.join(uri, "data")
    assert not os.path.isdir(data) or not [n for n in os.listdir(data) if n.endswith(".safetensors")]


def _plane_table(uri: str, c, frame: int, itemsize: int) -> list[int]:
    """The plane table of a stored ``byteplanes`` frame: each plane's stored size."""
    with open(os.path.join(uri, c.object), "rb") as f:
        f.seek(c.offset + c.codec.frame_start(frame))
        return [int.from_bytes(f.read(4), "little") for _ in range(itemsize)]


def test_mantissa_planes_are_stored_raw_and_exponent_planes_compressed_bitwise(tmp_path):
    uri = str(tmp_path / "c")
    w = _weights(torch.float32, (512, 256))  # 512 KiB: 4 frames of 128 KiB, planes of 32 KiB
    m = _save({"w": w}, uri, block_bytes=128 << 10)
    (c,) = m.tensors["w"].chunks
    assert c.codec.transform == "byteplanes" and len(c.codec.frames) == 4
    plane = (128 << 10) // 4
    for f in range(4):
        table = _plane_table(uri, c, f, 4)
        assert table[0] == table[1] == plane and table[3] < plane // 2, table  # low mantissa raw, exponent zstd
        assert 16 + sum(table) == c.codec.frames[f]
    out = {"w": torch.zeros_like(w)}
    ckpt.load(out, uri)
    assert torch.equal(out["w"].view(torch.int32), w.view(torch.int32))
    assert torch.equal(CheckpointReader(uri).read("w", Box((130, 7), (200, 100))), w[130:330, 7:107])


def test_a_damaged_raw_plane_is_named_by_object_and_frame_byte_range(tmp_path):
    uri = str(tmp_path / "c")
    w = _weights(torch.float32, (512, 256))
    m = _save({"w": w}, uri, block_bytes=128 << 10)
    (c,) = m.tensors["w"].chunks
    lo = c.offset + c.codec.frame_start(2)
    assert _plane_table(uri, c, 2, 4)[1] == (128 << 10) // 4
    at = lo + 16 + (128 << 10) // 4 + 100  # inside plane 1, stored raw
    flip_bits(os.path.join(uri, c.object), at, 0x01)
    with pytest.raises(CorruptChunkError) as e:
        ckpt.load({"w": torch.zeros_like(w)}, uri)
    message = str(e.value)
    assert c.object in message and f"[{lo}, {lo + c.codec.frames[2]})" in message and "w chunk" in message


def test_a_plane_table_that_does_not_add_up_is_refused_even_unverified(tmp_path):
    uri = str(tmp_path / "c")
    w = _weights(torch.float32, (512, 256))
    m = _save({"w": w}, uri, block_bytes=128 << 10)
    (c,) = m.tensors["w"].chunks
    lo = c.offset + c.codec.frame_start(1)
    with open(os.path.join(uri, c.object), "r+b") as f:
        f.seek(lo)
        f.write((1 << 30).to_bytes(4, "little"))
    with pytest.raises(CorruptChunkError, match=r"frame 1: plane table \[1073741824"):
        ckpt.load({"w": torch.zeros_like(w)}, uri, options=ckpt.LoadOptions(verify=False))


def test_frames_of_the_earlier_bytegroup_encoding_still_decode():
    # before byteplanes, a grouped frame was one zstd frame of all its planes (checkpoints of that
    # encoding say "transform": "bytegroup" and must keep loading)
    import zstandard

    from ckpt import codec

    raw = _weights(torch.bfloat16, (64, 64)).view(torch.uint8).reshape(-1).numpy()
    stored = zstandard.ZstdCompressor(level=1).compress(raw.reshape(-1, 2).T.copy())
    out = bytearray(len(raw))
    frame = codec.Codec("zstd", "bytegroup", len(raw), (len(stored),))
    codec.decode_frame(memoryview(stored), frame, 0, 2, memoryview(out), "legacy")
    assert bytes(out) == raw.tobytes()
    with pytest.raises(CorruptChunkError, match="legacy: frame 0 does not decompress"):
        codec.decode_frame(memoryview(stored[:-8]), frame, 0, 2, memoryview(out), "legacy")
