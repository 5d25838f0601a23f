"""The safetensors framing: what the one header writer writes, the stock library reads,
and the one header reader refuses, naming the file, the entry and its byte range."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load

from ckpt.errors import CheckpointFormatError
from ckpt.format import DTYPES
from ckpt.framing import (
    MAX_HEADER_BYTES,
    ChunkSpec,
    as_bytes,
    block_checksums,
    checksum,
    frame_order,
    object_header,
    read_safetensors_header,
    safetensors_header,
)
from ckpt.regions import Box

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
# The stock library's torch bindings know these; the framing itself knows every dtype in the table.
STOCK = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
         torch.int8, torch.uint8, torch.bool]


def _read(raw: bytes, where: str = "f.safetensors"):
    return read_safetensors_header(lambda a, b: raw[a:b], len(raw), where)


def _file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    order = frame_order(tensors, lambda k: tensors[k].dtype)
    head = safetensors_header(((k, tensors[k].dtype, tuple(tensors[k].shape)) for k in order), metadata)
    return head + b"".join(bytes(as_bytes(tensors[k].contiguous())) for k in order)


tensor_lists = st.lists(
    st.tuples(st.sampled_from(STOCK), st.lists(st.integers(0, 4), max_size=3).map(tuple)), min_size=1, max_size=6
)


@PROPS
@given(tensor_lists)
def test_written_files_parse_back_aligned_and_open_with_the_stock_library(specs):
    g = torch.Generator().manual_seed(len(specs))
    tensors = {}
    for i, (dtype, shape) in enumerate(specs):
        bits = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8, generator=g)
        t = bits.view(dtype).reshape(shape) if dtype != torch.bool else (bits % 2).bool().reshape(shape)
        tensors[f"t{i}"] = t
    raw = _file(tensors, {"format": "pt"})
    header = _read(raw)
    assert header.data_start % 8 == 0 and header.metadata == {"format": "pt"}
    for k, t in tensors.items():
        e = header.entries[k]
        assert (e.dtype, e.shape) == (t.dtype, tuple(t.shape))
        assert e.start % t.dtype.itemsize == 0  # widest first: every tensor viewable in place
        assert raw[e.start : e.stop] == bytes(as_bytes(t.contiguous()))
    assert max(e.stop for e in header.entries.values()) == len(raw)
    loaded = st_load(raw)
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape
        assert bytes(as_bytes(loaded[k].contiguous())) == bytes(as_bytes(t.contiguous()))


def test_every_dtype_of_the_table_round_trips_through_the_header():
    tensors = [(f"k{i}", dt, (3, 2)) for i, dt in enumerate(getattr(torch, n) for n in DTYPES)]
    size = sum(6 * dt.itemsize for _, dt, _ in tensors)
    raw = safetensors_header(tensors, {}) + b"\0" * size
    assert [(k, e.dtype, e.shape) for k, e in _read(raw).entries.items()] == tensors


def test_object_header_matches_format_md():
    """The example data object of docs/FORMAT.md, byte for byte."""
    specs = [
        ChunkSpec("model.w", Box((0, 0), (2, 4)), torch.float32),
        ChunkSpec("model.w", Box((2, 0), (1, 4)), torch.float32),
        ChunkSpec("model.b", Box((0,), (4,)), torch.bfloat16),
    ]
    head = object_header(specs, "31945bba-000000")
    text = (
        '{"__metadata__":{"format":"ckpt","save_id":"31945bba-000000"},'
        '"model.w@0,0":{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]},'
        '"model.w@2,0":{"dtype":"F32","shape":[1,4],"data_offsets":[32,48]},'
        '"model.b@0":{"dtype":"BF16","shape":[4],"data_offsets":[48,56]}}'
    )
    assert int.from_bytes(head[:8], "little") == 264 and head[8:] == text.encode() + b" " * 5
    assert ChunkSpec("s", Box((), ()), torch.float64).name == "s@"


def test_block_checksums():
    buf = memoryview(bytes(range(200)))
    assert block_checksums(buf, 64) == tuple(checksum(buf[i : i + 64]) for i in (0, 64, 128, 192))
    assert block_checksums(memoryview(b""), 64) == ("2d06800538d394c2",)


def _entry(**d) -> bytes:
    h = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **d}}).encode()
    return len(h).to_bytes(8, "little") + h + b"\0" * 8


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x01\x00", "header length -1, file size 2"),
        ((1 << 40).to_bytes(8, "little") + b"{}", f"header length {1 << 40}"),
        ((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b" " * 64, "header length"),
        ((20).to_bytes(8, "little") + b"{}", "header length 20, file size 10"),
        ((6).to_bytes(8, "little") + b"{nope}", "not valid JSON"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
        ((23).to_bytes(8, "little") + b'{"__metadata__":[1,2]} ', "__metadata__ is not a JSON object"),
        (_entry(data_offsets=[0, 16]), "x: bytes [0, 16) do not hold a F32 tensor of shape [2] inside the 8 data"),
        (_entry(data_offsets=[4, 12]), "x: bytes [4, 12) do not hold"),
        (_entry(data_offsets=[8, 0]), "x: bytes [8, 0) do not hold"),
        (_entry(shape=[-2, -1]), "x: bytes [0, 8) do not hold a F32 tensor of shape [-2, -1]"),
        (_entry(data_offsets=[0, "8"]), "x: malformed header entry"),
        (_entry(data_offsets=[0, 8.0]), "x: malformed header entry"),
        (_entry(data_offsets=[0]), "x: malformed header entry"),
        (_entry(shape=[True, 1]), "x: malformed header entry"),
        (_entry(shape="2"), "x: malformed header entry"),
        (_entry(dtype="F128"), "x: dtype F128 is not supported"),
        (_entry(dtype=["F32"]), "x: dtype ['F32'] is not supported"),
    ],
)
def test_damaged_headers_are_refused_naming_file_entry_and_range(raw, message):
    with pytest.raises(CheckpointFormatError) as ei:
        _read(raw, "dir/f.safetensors")
    assert str(ei.value).startswith("dir/f.safetensors: ") and message in str(ei.value), str(ei.value)
