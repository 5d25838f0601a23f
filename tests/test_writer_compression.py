"""The offline ``CheckpointWriter`` compressing as ``ckpt.save`` does: packed small tensors, a large
tensor written whole or streamed, caller-chosen objects; local files (header written last) and
object stores (header first); damage named; ``ckpt convert / reshard / merge --compress``."""

from __future__ import annotations

import contextlib
import io
import os

import fsspec
import pytest
import torch
from damage import flip_bits
from helpers import assert_bitwise, run_cli

import ckpt
from ckpt.cli import main
from ckpt.errors import CorruptChunkError
from ckpt.options import Compression, SaveOptions
from ckpt.reader import CheckpointReader
from ckpt.regions import Box
from ckpt.writer import CheckpointWriter

BLOCK = 4096
DTYPES = ("float32", "bfloat16", "int64", "int32")  # ints too: their chunks must round-trip bitwise compressed


def _weights(shape, dtype, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


TENSORS = {
    "packed.fp32": _weights((40, 50), torch.float32, 1),  # 8000 bytes: packed with the others, compressed
    "packed.bf16": _weights((64, 64), torch.bfloat16, 2),
    "packed.i64": torch.arange(1000, dtype=torch.int64),
    "packed.i32": torch.randint(0, 50, (3000,), dtype=torch.int32, generator=torch.Generator().manual_seed(3)),
    "packed.tiny": _weights((5, 5), torch.float32, 4),  # under 4 KiB: stored raw
    "packed.i8": torch.arange(100, dtype=torch.int8),  # a dtype not compressed
    "packed.scalar": torch.tensor(2.5),
    "packed.empty": torch.empty(0, 4),
    "big.fp32": _weights((300, 200), torch.float32, 5),  # >= pack_bytes: an object of its own, 4 chunks
}
STREAMED = _weights((257, 129), torch.bfloat16, 6)  # 254-row chunks, then a 3-row chunk under 4 KiB
OBJ_BF16 = _weights((64, 64), torch.bfloat16, 7)
OBJ_I16 = torch.arange(777, dtype=torch.int16)  # not compressed, sent after an encoded chunk


def _options(compress: bool, **kw) -> SaveOptions:
    c = Compression(dtypes=DTYPES) if compress else None
    return SaveOptions(chunk_bytes=64 << 10, block_bytes=BLOCK, compression=c, **kw)


def write(uri: str, compress: bool = True, **kw) -> ckpt.Manifest:
    with CheckpointWriter(uri, _options(compress, **kw), pack_bytes=32 << 10) as w:
        for k, t in TENSORS.items():
            w.write_tensor(k, t)
        with w.tensor_stream("streamed", STREAMED.shape, STREAMED.dtype) as s:
            assert len(s.boxes) == 2
            for b in s.boxes:
                s.send(STREAMED[b.slices()].clone())
        w.declare("obj.bf16", OBJ_BF16.shape, OBJ_BF16.dtype)
        w.declare("obj.i16", OBJ_I16.shape, OBJ_I16.dtype)
        with w.object_stream([("obj.bf16", Box.full(OBJ_BF16.shape)), ("obj.i16", Box.full(OBJ_I16.shape))]) as s:
            s.send(OBJ_BF16)
            s.send(OBJ_I16)
        w.set_value("lr", 0.1)
        return w.commit(step=3)


def _expected() -> dict[str, torch.Tensor]:
    return {**TENSORS, "streamed": STREAMED, "obj.bf16": OBJ_BF16, "obj.i16": OBJ_I16}


def assert_loads_bitwise(uri: str, **load) -> None:
    out: dict = {k: torch.zeros_like(t) for k, t in _expected().items()}
    out["lr"] = None
    ckpt.load(out, uri, **load)
    for k, t in _expected().items():
        assert_bitwise(out[k], t)
    assert out["lr"] == 0.1


def _stored_bytes(m: ckpt.Manifest) -> int:
    return sum(c.stored for rec in m.tensors.values() for c in rec.chunks)


@pytest.fixture(params=[True, False], ids=["header-last", "object-store"])
def seekable(request, monkeypatch) -> bool:
    """Local files write the header last; with ``False`` the writer behaves as on an object store."""
    if not request.param:
        monkeypatch.setattr("ckpt.engine._seekable", lambda f: False)
    return request.param


def test_compressed_writer_output_loads_bitwise_and_verifies(tmp_path, seekable):
    uri = str(tmp_path / "c")
    m = write(uri)
    assert_loads_bitwise(uri)
    assert CheckpointReader(uri).verify() == []
    code, _, err = run_cli("verify", uri)
    assert code == 0, err
    for key in ("packed.fp32", "packed.bf16", "packed.i64", "packed.i32", "big.fp32", "obj.bf16"):
        assert all(c.codec is not None for c in m.tensors[key].chunks), key
    for key in ("packed.tiny", "packed.i8", "packed.scalar"):
        assert all(c.codec is None for c in m.tensors[key].chunks), key
    assert len(m.tensors["big.fp32"].chunks) == 4 and m.tensors["streamed"].chunks[0].codec is not None
    if seekable:  # the object's later chunks are encoded: a raw int16 there could not start aligned
        assert m.tensors["obj.i16"].chunks[0].codec is not None
    else:  # held and written as ckpt.save writes: raw first
        (i16,) = m.tensors["obj.i16"].chunks
        (bf16,) = m.tensors["obj.bf16"].chunks
        assert i16.codec is None and i16.offset < bf16.offset


def test_compressed_is_smaller_than_raw_and_reads_regions(tmp_path, seekable):
    raw, packed = write(str(tmp_path / "raw"), compress=False), write(str(tmp_path / "z"))
    assert _stored_bytes(packed) < 0.9 * _stored_bytes(raw)
    on_disk = sum(os.path.getsize(os.path.join(tmp_path / "z", o)) for o in packed.objects if o.startswith("data/"))
    assert on_disk < sum(os.path.getsize(os.path.join(tmp_path / "raw", o)) for o in raw.objects
                         if o.startswith("data/"))
    r = CheckpointReader(str(tmp_path / "z"))
    assert torch.equal(r.read("big.fp32", Box((100, 7), (150, 60))), TENSORS["big.fp32"][100:250, 7:67])


def test_a_damaged_frame_of_a_streamed_tensor_is_named_by_object_byte_range_and_key(tmp_path, seekable):
    uri = str(tmp_path / "c")
    m = write(uri)
    c = m.tensors["big.fp32"].chunks[1]
    assert c.codec is not None and len(c.codec.frames) > 3
    lo = c.offset + c.codec.frame_start(2)
    flip_bits(os.path.join(uri, c.object), lo + 5, 0xFF)
    with pytest.raises(CorruptChunkError) as e:
        ckpt.load({"big.fp32": torch.zeros_like(TENSORS["big.fp32"])}, uri, options=ckpt.LoadOptions(partial=True))
    message = str(e.value)
    assert c.object in message and f"[{lo}, {lo + c.codec.frames[2]})" in message and "big.fp32 chunk" in message
    (failure,) = CheckpointReader(uri).verify()
    assert c.object in failure and "block 2" in failure


def test_a_stream_that_stops_short_commits_nothing_and_the_writer_refuses_incremental(tmp_path):
    uri = str(tmp_path / "c")
    with CheckpointWriter(uri, _options(True)) as w:
        with pytest.raises(ValueError, match="1 of 2 chunks"):
            with w.tensor_stream("streamed", STREAMED.shape, STREAMED.dtype) as s:
                s.send(STREAMED[s.boxes[0].slices()])
    assert not os.path.exists(os.path.join(uri, "manifest.json"))
    for opts in (SaveOptions(incremental=True), SaveOptions(incremental_from="../a")):
        with pytest.raises(ValueError, match="incremental"):
            CheckpointWriter(str(tmp_path / "d"), opts)


@pytest.mark.s3
def test_compressed_writer_through_s3(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/c"
    opts = s3_server.storage_options()
    m = write(uri, storage_options=opts)
    assert m.tensors["big.fp32"].chunks[0].codec is not None
    assert m.tensors["obj.i16"].chunks[0].codec is None  # an object store: held, then raw chunks first
    assert_loads_bitwise(uri, options=ckpt.LoadOptions(storage_options=opts))
    assert CheckpointReader(uri, ckpt.LoadOptions(storage_options=opts)).verify() == []
    c = m.tensors["big.fp32"].chunks[2]
    lo = c.offset + c.codec.frame_start(1)
    s3 = "s3://" + s3_bucket + "/c/" + c.object
    fs = fsspec.filesystem("s3", **opts)
    raw = bytearray(fs.cat_file(s3))
    raw[lo + 3] ^= 0x40
    fs.pipe_file(s3, bytes(raw))
    with pytest.raises(CorruptChunkError) as e:
        ckpt.load({"big.fp32": torch.zeros_like(TENSORS["big.fp32"])}, uri,
                  options=ckpt.LoadOptions(storage_options=opts, partial=True))
    assert c.object in str(e.value) and f"[{lo}, {lo + c.codec.frames[1]})" in str(e.value)


def test_cli_convert_and_reshard_compress(tmp_path):
    src = str(tmp_path / "src")
    write(src, compress=False)
    dst = str(tmp_path / "z")
    code, _, err = run_cli("convert", src, dst, "--compress", "--block-bytes", "4KiB", "--chunk-bytes", "64KiB")
    assert code == 0, err
    m = CheckpointReader(dst).manifest
    assert all(c.codec is not None for c in m.tensors["big.fp32"].chunks)
    assert m.tensors["packed.bf16"].chunks[0].codec is not None
    assert m.tensors["packed.i64"].chunks[0].codec is None  # the CLI compresses floating-point dtypes
    assert _stored_bytes(m) < _stored_bytes(CheckpointReader(src).manifest)
    assert_loads_bitwise(dst)
    assert run_cli("diff", src, dst)[0] == 0 and run_cli("verify", dst)[0] == 0
    laid = str(tmp_path / "laid")
    code, _, err = run_cli("reshard", src, laid, "--for-world", "2", "--compress-level", "3", "--block-bytes", "4KiB")
    assert code == 0, err
    assert CheckpointReader(laid).manifest.tensors["big.fp32"].chunks[0].codec is not None
    assert_loads_bitwise(laid)
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit) as e:
        main(["convert", src, str(tmp_path / "x"), "--compress-level", "0"])
    assert e.value.code == 2 and "zstd levels are 1 to 22" in err.getvalue()


def test_cli_merge_compresses(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    sa, sb = {"w": _weights((128, 64), torch.float32, 1)}, {"w": _weights((128, 64), torch.float32, 2)}
    ckpt.save(sa, a, step=1)
    ckpt.save(sb, b, step=2)
    out = str(tmp_path / "m")
    code, _, err = run_cli("merge", a, b, "-o", out, "--compress", "-q")
    assert code == 0, err
    (c,) = CheckpointReader(out).manifest.tensors["w"].chunks
    assert c.codec is not None and c.stored < c.length
    got = {"w": torch.zeros(128, 64)}
    ckpt.load(got, out)
    assert torch.allclose(got["w"], (sa["w"].double() + sb["w"].double()).div(2).float())
    code, _, err = run_cli("merge", a, b, "-o", str(tmp_path / "h"), "--format", "hf", "--compress", "-q")
    assert code == 2 and "compression" in err
