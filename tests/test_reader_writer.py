"""Offline access: ``CheckpointReader`` (regions, chunks, verify) and the streaming
``CheckpointWriter`` (packing, streams, commit only when complete)."""

from __future__ import annotations

import os

import pytest
import torch
from damage import flip_bits
from helpers import assert_bitwise, random_tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt import Box, CheckpointExistsError, CheckpointFormatError, CheckpointNotFoundError, SaveOptions
from ckpt.errors import UnsupportedValueError
from ckpt.format import MANIFEST
from ckpt.reader import CheckpointReader
from ckpt.writer import CheckpointWriter

OPTS = SaveOptions(chunk_bytes=512, block_bytes=64)
TENSORS = {
    "small.a": random_tensor((3, 5), torch.float32, 1),
    "small.b": random_tensor((7,), torch.int16, 2),
    "small.c": random_tensor((2, 3), torch.float64, 3),
    "small.d": random_tensor((), torch.int8, 4),
    "big": random_tensor((40, 33), torch.float32, 5),  # >= pack_bytes: an object of its own
}
STREAMED = random_tensor((20, 9, 7), torch.bfloat16, 6)


def write_example(uri: str) -> ckpt.Manifest:
    with CheckpointWriter(uri, OPTS, pack_bytes=1024) as w:
        for k, t in TENSORS.items():
            w.write_tensor(k, t)
        with w.tensor_stream("streamed", STREAMED.shape, STREAMED.dtype) as s:
            assert len(s.boxes) > 1
            for b in s.boxes:
                s.send(STREAMED[b.slices()])
        w.set_value("config", {"lr": 0.1, "layers": [1, 2]})
        return w.commit(step=7, metrics={"loss": 1.5})


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[str, ckpt.Manifest]:
    uri = str(tmp_path_factory.mktemp("rw") / "c")
    return uri, write_example(uri)


def test_writer_output_loads_with_ckpt_load(written):
    uri, m = written
    assert m.step == 7 and m.metrics == {"loss": 1.5}
    dst = {k: torch.zeros_like(t) for k, t in TENSORS.items()}
    dst["streamed"] = torch.zeros_like(STREAMED)
    dst["config"] = None
    ckpt.load(dst, uri)
    for k, t in TENSORS.items():
        assert_bitwise(dst[k], t)
    assert_bitwise(dst["streamed"], STREAMED)
    assert dst["config"] == {"lr": 0.1, "layers": [1, 2]}


def test_writer_packs_small_tensors_and_isolates_large_ones(written):
    uri, m = written
    objects_of = {k: {c.object for c in r.chunks} for k, r in m.tensors.items()}
    small = set().union(*(objects_of[k] for k in TENSORS if k.startswith("small.")))
    assert len(small) == 1, objects_of  # 15*4+7*2+6*8+1 bytes < pack_bytes: one shared object
    for k in ("big", "streamed"):
        others = set().union(*(o for key, o in objects_of.items() if key != k))
        assert objects_of[k].isdisjoint(others), f"{k} shares an object"
    assert set(m.objects) == set().union(*objects_of.values())
    for r in m.tensors.values():
        for c in r.chunks:
            assert c.offset % r.dtype.itemsize == 0, "chunks must be aligned to their item size"
            assert c.length <= max(OPTS.chunk_bytes, r.dtype.itemsize)
    on_disk = {f"data/{n}" for n in os.listdir(os.path.join(uri, "data"))}
    assert on_disk == set(m.objects)


def test_reader_metadata_and_errors(written):
    uri, _ = written
    r = CheckpointReader(uri)
    assert r.keys() == sorted([*TENSORS, "streamed"])
    assert r.values == {"config": {"lr": 0.1, "layers": [1, 2]}}
    assert r.record("streamed").shape == STREAMED.shape and r.record("streamed").dtype == torch.bfloat16
    with pytest.raises(KeyError, match="nope"):
        r.read("nope")
    with pytest.raises(ValueError, match="outside shape"):
        r.read("big", Box((39, 0), (2, 33)))
    with pytest.raises(ValueError, match="out has shape"):
        r.read("big", Box((0, 0), (2, 3)), out=torch.zeros(3, 2))
    with pytest.raises(CheckpointNotFoundError):
        CheckpointReader(os.path.join(uri, "missing"))


def test_reader_reads_whole_tensors_and_casts_into_out(written):
    uri, _ = written
    r = CheckpointReader(uri)
    for k, t in TENSORS.items():
        assert_bitwise(r.read(k), t)
    out = torch.zeros(5, 9, 7, dtype=torch.float32)
    got = r.read("streamed", Box((3, 0, 0), (5, 9, 7)), out=out)
    assert got is out
    assert_bitwise(out, STREAMED[3:8].float())


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_reader_reads_any_region_bitwise(written, data):
    uri, _ = written
    r = CheckpointReader(uri)
    offsets, sizes = [], []
    for n in STREAMED.shape:
        lo = data.draw(st.integers(0, n))
        offsets.append(lo)
        sizes.append(data.draw(st.integers(0, n - lo)))
    box = Box(tuple(offsets), tuple(sizes))
    assert_bitwise(r.read("streamed", box), STREAMED[box.slices()])


def test_iter_chunks_tiles_the_tensor_in_stored_order(written):
    uri, m = written
    r = CheckpointReader(uri)
    boxes = []
    seen = torch.zeros(STREAMED.shape, dtype=torch.int32)
    for box, data in r.iter_chunks("streamed"):
        assert_bitwise(data, STREAMED[box.slices()])
        seen[box.slices()] += 1
        boxes.append(box)
    assert boxes == [c.box for c in m.tensors["streamed"].chunks]
    assert torch.equal(seen, torch.ones_like(seen))


def test_verify_reports_each_corrupt_chunk(tmp_path):
    uri = str(tmp_path / "c")
    m = write_example(uri)
    assert CheckpointReader(uri).verify() == []
    bad = [("big", m.tensors["big"].chunks[1]), ("big", m.tensors["big"].chunks[3])]
    bad.append(("streamed", m.tensors["streamed"].chunks[-1]))
    flip_bits(os.path.join(uri, bad[0][1].object), bad[0][1].offset + bad[0][1].length - 1, 0x01)
    flip_bits(os.path.join(uri, bad[1][1].object), bad[1][1].offset + 5, 0x01)
    flip_bits(os.path.join(uri, bad[2][1].object), bad[2][1].offset, 0x01)
    failures = CheckpointReader(uri).verify()
    assert len(failures) == 3, failures
    for line, (key, c) in zip(failures, bad):
        assert c.object in line and f"{key} chunk {c.box}" in line, line
    # other chunks of the same tensors still read fine
    r = CheckpointReader(uri)
    good = m.tensors["big"].chunks[0].box
    assert_bitwise(r.read("big", good), TENSORS["big"][good.slices()])
    with pytest.raises(ckpt.CorruptChunkError):
        r.read("big")


def test_verify_reports_truncated_object(tmp_path):
    uri = str(tmp_path / "c")
    m = write_example(uri)
    c = m.tensors["big"].chunks[-1]
    os.truncate(os.path.join(uri, c.object), c.offset + 1)
    failures = CheckpointReader(uri).verify()
    assert failures and all(c.object in f for f in failures), failures


def test_stream_with_too_few_chunks_commits_nothing(tmp_path):
    uri = str(tmp_path / "c")
    w = CheckpointWriter(uri, OPTS)
    w.write_tensor("x", torch.ones(3))
    with pytest.raises(ValueError, match=r"1 of \d+ chunks written"):
        with w.tensor_stream("s", STREAMED.shape, STREAMED.dtype) as s:
            s.send(STREAMED[s.boxes[0].slices()])
    assert not os.path.exists(os.path.join(uri, MANIFEST))
    # committing anyway must not produce a checkpoint with a hole in "s"
    with pytest.raises(CheckpointFormatError, match=r"\bs: chunks cover"):
        w.commit()
    with pytest.raises(CheckpointNotFoundError):
        CheckpointReader(uri)


def test_stream_with_too_many_or_misshapen_chunks_errors(tmp_path):
    uri = str(tmp_path / "c")
    w = CheckpointWriter(uri, OPTS)
    with pytest.raises(ValueError, match="more chunks sent"):
        with w.tensor_stream("s", (4, 3), torch.float32) as s:
            for b in s.boxes:
                s.send(torch.zeros(b.sizes))
            s.send(torch.zeros(s.boxes[-1].sizes))
    with pytest.raises(ValueError, match="got shape"):
        with w.tensor_stream("t", (4, 3), torch.float32) as s:
            s.send(torch.zeros(3, 4))
    assert not os.path.exists(os.path.join(uri, MANIFEST))


def test_leaving_the_with_block_by_exception_commits_nothing(tmp_path):
    uri = str(tmp_path / "c")
    with pytest.raises(RuntimeError, match="crash"):
        with CheckpointWriter(uri, OPTS, pack_bytes=16) as w:
            w.write_tensor("a", torch.arange(100.0))  # flushed to an object already
            w.set_value("v", 1)
            raise RuntimeError("crash")
    assert os.listdir(os.path.join(uri, "data")), "the test must exercise written-but-uncommitted data"
    with pytest.raises(CheckpointNotFoundError):
        ckpt.load({"a": torch.zeros(100)}, uri)
    # the location is still free for a complete checkpoint
    with CheckpointWriter(uri, OPTS) as w:
        w.write_tensor("a", torch.arange(100.0))
        w.commit()
    dst = {"a": torch.zeros(100)}
    ckpt.load(dst, uri)
    assert torch.equal(dst["a"], torch.arange(100.0))


def test_writer_refuses_duplicates_and_non_json(tmp_path):
    w = CheckpointWriter(str(tmp_path / "c"), OPTS)
    w.write_tensor("a", torch.zeros(2))
    with pytest.raises(ValueError, match="a: written twice"):
        w.write_tensor("a", torch.zeros(2))
    with pytest.raises(ValueError, match="a: written twice"):
        w.set_value("a", 1)
    w.set_value("v", 1)
    with pytest.raises(ValueError, match="v: written twice"):
        w.write_tensor("v", torch.zeros(2))
    with pytest.raises(UnsupportedValueError, match=r"bad\.x"):
        w.set_value("bad", {"x": object()})
    with pytest.raises(UnsupportedValueError, match="big.*complex128"):
        w.write_tensor("big", torch.zeros(2, dtype=torch.complex128))


def test_writer_respects_committed_checkpoints(tmp_path):
    uri = str(tmp_path / "c")
    first = write_example(uri)
    with pytest.raises(CheckpointExistsError):
        CheckpointWriter(uri, OPTS)
    with CheckpointWriter(uri, SaveOptions(chunk_bytes=512, block_bytes=64, overwrite=True)) as w:
        w.write_tensor("only", torch.arange(5))
        m = w.commit()
    assert set(m.tensors) == {"only"} and not set(m.objects) & set(first.objects)
    assert {f"data/{n}" for n in os.listdir(os.path.join(uri, "data"))} == set(m.objects)
    assert_bitwise(CheckpointReader(uri).read("only"), torch.arange(5))
