"""Single-process ``ckpt.save`` / ``ckpt.load``: bitwise round trips, errors, commit
safety, corruption detection, and that partial loads read only what they need."""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from contextlib import contextmanager

import fsspec
import pytest
import torch
from damage import flip_bits
from helpers import assert_bitwise, bits, edit_manifest, manifest_of, random_tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import ckpt
from ckpt import (
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptChunkError,
    LoadOptions,
    SaveOptions,
    Sharded,
    StateDictMismatchError,
    UnsupportedValueError,
)
from ckpt.format import DTYPES, MANIFEST
from ckpt.storage import FsspecStorage, LocalStorage

ALL_DTYPES = [getattr(torch, name) for name in DTYPES]
SMALL = SaveOptions(chunk_bytes=256, block_bytes=64)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bitwise(tmp_path, dtype):
    src = {
        "big": random_tensor((7, 13), dtype, 1),  # > chunk_bytes: several chunks, partial blocks
        "scalar": random_tensor((), dtype, 2),
        "empty": random_tensor((3, 0), dtype, 3),
    }
    path = str(tmp_path / "c")
    ckpt.save(src, path, options=SMALL)
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    ckpt.load(dst, path)
    for k in src:
        assert_bitwise(dst[k], src[k])
    m = manifest_of(path)
    assert m.tensors["big"].dtype == dtype
    if 7 * 13 * dtype.itemsize > SMALL.chunk_bytes:
        assert len(m.tensors["big"].chunks) > 1


def test_unsupported_dtype_names_the_key(tmp_path):
    with pytest.raises(UnsupportedValueError, match=r"model\.w.*complex128"):
        ckpt.save({"model": {"w": torch.zeros(2, dtype=torch.complex128)}}, str(tmp_path / "c"))
    assert not (tmp_path / "c" / MANIFEST).exists()


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 4, 5), (2, 0, 3), (1,), (1, 1, 1)], ids=str)
def test_degenerate_shapes(tmp_path, shape):
    src = {"t": random_tensor(shape, torch.float32, 5)}
    ckpt.save(src, str(tmp_path / "c"), options=SMALL)
    dst = {"t": torch.full(shape, 7.0)}
    ckpt.load(dst, str(tmp_path / "c"))
    assert_bitwise(dst["t"], src["t"])


def test_non_contiguous_sources_and_targets(tmp_path):
    base = random_tensor((12, 10), torch.float32, 6)
    src = {
        "transposed": base.t(),
        "sliced": base[1::3, 2:9:2],
        "expanded": torch.arange(5.0).unsqueeze(0).expand(4, 5),
        "narrow_bf16": random_tensor((6, 40), torch.bfloat16, 7)[:, 3:30],
        "channels_last": random_tensor((2, 3, 4, 5), torch.float16, 8).to(memory_format=torch.channels_last),
    }
    path = str(tmp_path / "c")
    ckpt.save(src, path, options=SMALL)
    # targets: contiguous ones, and a strided view into a larger buffer that must stay untouched elsewhere
    holder = torch.full((20, 24), -1.0)
    dst = {
        "transposed": torch.zeros(10, 12),
        "sliced": holder[2:6, 1:16:4],
        "expanded": torch.zeros(5, 4).t(),
        "narrow_bf16": torch.zeros(6, 27, dtype=torch.bfloat16),
        "channels_last": torch.zeros(2, 3, 4, 5, dtype=torch.float16).to(memory_format=torch.channels_last),
    }
    before = holder.clone()
    ckpt.load(dst, path)
    for k in src:
        assert_bitwise(dst[k], src[k])
    assert dst["sliced"].data_ptr() == holder[2:6, 1:16:4].data_ptr()  # loaded in place
    untouched = torch.ones_like(holder, dtype=torch.bool)
    untouched[2:6, 1:16:4] = False
    assert torch.equal(holder[untouched], before[untouched])


def test_large_tensor_many_chunks_small_blocks(tmp_path):
    src = {"w": random_tensor((300, 257), torch.float32, 8), "r": random_tensor((3, 5000), torch.float16, 9)}
    opts = SaveOptions(chunk_bytes=4096, block_bytes=128)
    path = str(tmp_path / "c")
    ckpt.save(src, path, options=opts)
    m = manifest_of(path)
    for key, rec in m.tensors.items():
        assert len(rec.chunks) > 1
        assert sum(c.box.numel for c in rec.chunks) == src[key].numel()
        for c in rec.chunks:
            assert c.length <= opts.chunk_bytes
            assert len(c.checksums) == -(-c.length // opts.block_bytes)
    dst = {k: torch.empty_like(v) for k, v in src.items()}
    ckpt.load(dst, path)
    for k in src:
        assert_bitwise(dst[k], src[k])


def test_nested_structure_and_json_values(tmp_path):
    t = [random_tensor((3, 4), torch.float32, i) for i in range(4)]
    values = {
        "int": -(2**62),
        "big_int": 2**80,
        "float": 0.1,
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "bool": True,
        "str": 'héllo\n"quoted"',
        "none": None,
        "nested_list": [1, [2.5, [None, "x"]], {"k": [True]}],
        "empty_dict": {},
        "empty_list": [],
        "tuple": (1, 2),
    }
    src = {"model": {"layers": [t[0], {"w": t[1], "b": t[2]}], "head": (t[3],)}, "meta": values}
    path = str(tmp_path / "c")
    ckpt.save(src, path)
    dst = {
        "model": {
            "layers": [torch.zeros(3, 4), {"w": torch.zeros(3, 4), "b": torch.zeros(3, 4)}],
            "head": (torch.zeros(3, 4),),
        },
        "meta": {k: 0 for k in values},
    }
    head = dst["model"]["head"][0]
    ckpt.load(dst, path)
    assert_bitwise(dst["model"]["layers"][0], t[0])
    assert_bitwise(dst["model"]["layers"][1]["w"], t[1])
    assert_bitwise(dst["model"]["layers"][1]["b"], t[2])
    assert dst["model"]["head"][0] is head and torch.equal(head, t[3])
    got = dst["meta"]
    assert math.isnan(got.pop("nan"))  # nan/inf round-trip as Python floats
    expected = {k: v for k, v in values.items() if k != "nan"}
    assert got == expected and type(got["tuple"]) is tuple  # a tagged encoding keeps tuples tuples
    assert type(got["big_int"]) is int and type(got["float"]) is float and got["bool"] is True


def test_tuple_value_comes_back_as_tuple_when_the_target_holds_one(tmp_path):
    ckpt.save({"betas": (0.9, 0.999)}, str(tmp_path / "c"))
    dst = {"betas": (0.0, 0.0)}
    ckpt.load(dst, str(tmp_path / "c"))
    assert dst["betas"] == (0.9, 0.999)


def test_optimizer_state_with_int_keys(tmp_path):
    def trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3 * (seed + 1))
        for _ in range(seed + 1):
            model(torch.randn(5, 4)).sum().backward()
            opt.step()
        return model, opt

    model, opt = trained(0)
    sd = {"model": model.state_dict(), "optim": opt.state_dict()}
    assert 0 in sd["optim"]["state"]
    path = str(tmp_path / "c")
    ckpt.save(sd, path, step=1)

    model2, opt2 = trained(1)  # different values, same structure
    sd2 = {"model": model2.state_dict(), "optim": opt2.state_dict()}
    ckpt.load(sd2, path)
    model2.load_state_dict(sd2["model"])
    opt2.load_state_dict(sd2["optim"])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert_bitwise(a.detach(), b.detach())
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            assert_bitwise(opt2.state_dict()["state"][i][k], v)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_load_straight_into_parameters(tmp_path):
    torch.manual_seed(0)
    src, dst = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    ckpt.save(dict(src.named_parameters()), str(tmp_path / "c"))
    params = dict(dst.named_parameters())
    ckpt.load(params, str(tmp_path / "c"))
    assert params["weight"] is dst.weight and dst.weight.requires_grad
    assert_bitwise(dst.weight.detach(), src.weight.detach())
    assert_bitwise(dst.bias.detach(), src.bias.detach())


def test_empty_state_dict(tmp_path):
    ckpt.save({}, str(tmp_path / "c"))
    m = ckpt.load({}, str(tmp_path / "c"))
    assert m.tensors == {} and m.values == {}


def test_manifest_records_step_metrics_metadata(tmp_path):
    path = str(tmp_path / "c")
    ckpt.save({"x": torch.ones(2)}, path, step=42, metrics={"loss": 2.5}, metadata={"run": "a"})
    m = ckpt.load({"x": torch.zeros(2)}, path)
    assert (m.step, m.metrics, m.metadata) == (42, {"loss": 2.5}, {"run": "a"})


def test_memory_uri_round_trip():
    uri = f"memory://ckpt-tests/{uuid.uuid4().hex}/c"
    try:
        src = {"w": random_tensor((40, 9), torch.bfloat16, 10), "n": 3}
        ckpt.save(src, uri, options=SMALL)
        dst = {"w": torch.zeros(40, 9, dtype=torch.bfloat16), "n": 0}
        ckpt.load(dst, uri)
        assert_bitwise(dst["w"], src["w"])
        assert dst["n"] == 3
        with pytest.raises(CheckpointExistsError):
            ckpt.save(src, uri)
    finally:
        fsspec.filesystem("memory").rm(uri.split("://", 1)[1].rsplit("/", 1)[0], recursive=True)


def test_data_objects_open_with_stock_safetensors(tmp_path):
    src = {
        "w": random_tensor((9, 31), torch.float32, 11),
        "h": random_tensor((5, 7), torch.bfloat16, 12),
        "b": random_tensor((17,), torch.bool, 13),
        "i": random_tensor((4, 4), torch.int8, 14),
        "s": random_tensor((), torch.float64, 15),
    }
    path = str(tmp_path / "c")
    ckpt.save(src, path, options=SMALL)
    m = manifest_of(path)
    seen = 0
    for obj in m.objects:
        with safe_open(os.path.join(path, obj), framework="pt") as f:
            names = set(f.keys())
            for key, rec in m.tensors.items():
                for c in rec.chunks:
                    if c.object != obj:
                        continue
                    name = f"{key}@{','.join(map(str, c.box.offsets))}"
                    assert name in names
                    assert_bitwise(f.get_tensor(name), src[key][c.box.slices()].contiguous())
                    seen += 1
    assert seen == sum(len(r.chunks) for r in m.tensors.values())


# ---------------------------------------------------------------- resharding loads (real load path)


@pytest.fixture(scope="module")
def saved_3d(tmp_path_factory):
    full = random_tensor((6, 7, 9), torch.float32, 16)
    path = str(tmp_path_factory.mktemp("reshard") / "c")
    ckpt.save({"w": full}, path, options=SaveOptions(chunk_bytes=200, block_bytes=64))
    return path, full


@st.composite
def sub_box(draw, shape):
    offs, sizes = [], []
    for n in shape:
        lo = draw(st.integers(0, n - 1))
        offs.append(lo)
        sizes.append(draw(st.integers(1, n - lo)))
    return offs, sizes


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sub_box((6, 7, 9)),
    st.integers(0, 300),
    st.integers(1, 2000),
    st.booleans(),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_load_any_box_through_sharded(saved_3d, box, gap, max_read, verify, dtype):
    path, full = saved_3d
    offs, sizes = box
    local = torch.full(sizes, -3.0, dtype=dtype)
    opts = LoadOptions(max_gap_bytes=gap, max_read_bytes=max_read, verify=verify, allow_dtype_cast=True, io_threads=2)
    ckpt.load({"w": Sharded.box(local, full.shape, offs)}, path, options=opts)
    want = full[tuple(slice(o, o + s) for o, s in zip(offs, sizes))].to(dtype)
    assert_bitwise(local, want)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_load_any_flat_range_through_sharded(saved_3d, data):
    path, full = saved_3d
    start = data.draw(st.integers(0, full.numel() - 1))
    stop = data.draw(st.integers(start + 1, full.numel()))
    local = torch.full((stop - start,), -3.0)
    ckpt.load(
        {"w": Sharded.flat(local, full.shape, start)},
        path,
        options=LoadOptions(max_gap_bytes=data.draw(st.integers(0, 64))),
    )
    assert_bitwise(local, full.reshape(-1)[start:stop])


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sub_box((6, 7, 9)), st.data())
def test_load_any_flat_range_of_a_box_through_sharded(saved_3d, box, data):
    """A distributed optimizer under TP: its partition is a flat range of a TP shard (a box)."""
    path, full = saved_3d
    offs, sizes = box
    inside = full[tuple(slice(o, o + s) for o, s in zip(offs, sizes))].contiguous().view(-1)
    start = data.draw(st.integers(0, inside.numel() - 1))
    stop = data.draw(st.integers(start + 1, inside.numel()))
    local = torch.full((stop - start,), -3.0)
    ckpt.load({"w": Sharded.flat(local, full.shape, start, within=(offs, sizes))}, path)
    assert_bitwise(local, inside[start:stop])


# ---------------------------------------------------------------- partial reads stay partial


@pytest.fixture
def read_log(monkeypatch):
    """Every (object, start, length) that load fetches from storage, by whichever
    entry point it uses (scatter reads, or mapping a local file's range)."""
    log: list[tuple[str, int, int]] = []
    for backend in (LocalStorage, FsspecStorage):  # the backends any_uri opens
        real_read, real_map = backend.read_into_many, backend.map_range

        def read_into_many(self, rel, start, bufs, real_read=real_read):
            log.append((rel, start, sum(len(b) for b in bufs)))
            return real_read(self, rel, start, bufs)

        def map_range(self, rel, start, stop, real_map=real_map):
            view = real_map(self, rel, start, stop)
            if view is not None:
                log.append((rel, start, stop - start))
            return view

        monkeypatch.setattr(backend, "read_into_many", read_into_many)
        monkeypatch.setattr(backend, "map_range", map_range)
    return log


def test_partial_load_reads_only_the_touched_blocks(any_uri, read_log):
    # one 2 MiB chunk; a row is 8 KiB = 2 blocks, the box touches one block per row
    full = random_tensor((256, 2048), torch.float32, 17)
    B = 4096
    ckpt.save({"w": full}, any_uri, options=SaveOptions(chunk_bytes=4 << 20, block_bytes=B))
    (chunk,) = manifest_of(any_uri).tensors["w"].chunks
    rows, cols = (100, 106), (50, 57)
    wanted_bytes = [(r * 2048 + c) * 4 + i for r in range(*rows) for c in range(*cols) for i in range(4)]
    touched = {b // B for b in wanted_bytes}
    assert len(touched) == rows[1] - rows[0] < chunk.length // B

    def load_box(**opts) -> int:
        read_log.clear()
        local = torch.zeros(rows[1] - rows[0], cols[1] - cols[0])
        ckpt.load({"w": Sharded.box(local, full.shape, (rows[0], cols[0]))}, any_uri, options=LoadOptions(**opts))
        assert_bitwise(local, full[rows[0] : rows[1], cols[0] : cols[1]])
        assert read_log, "load fetched bytes by an entry point this test does not see"
        for obj, start, n in read_log:
            assert obj == chunk.object and chunk.offset <= start and start + n <= chunk.offset + chunk.length
        return sum(n for _, _, n in read_log)

    # no coalescing through gaps: exactly the checksum blocks the box touches
    assert load_box(max_gap_bytes=0) == len(touched) * B
    # default coalescing: at most the touched blocks plus the gaps between them
    got = load_box()
    assert got <= (max(touched) - min(touched) + 1) * B
    assert got < chunk.length // 8
    # without verification, only the wanted bytes (plus coalesced gaps) are read
    assert load_box(max_gap_bytes=0, verify=False) == (rows[1] - rows[0]) * (cols[1] - cols[0]) * 4


# ---------------------------------------------------------------- errors


def test_unsupported_value_names_its_key_path(tmp_path):
    with pytest.raises(UnsupportedValueError, match=r"opt\.groups\.1\.fn.*builtins\.object"):
        ckpt.save({"opt": {"groups": [torch.zeros(1), {"fn": object()}]}}, str(tmp_path / "a"))
    with pytest.raises(UnsupportedValueError) as raised:  # every bad value at once, each by its key
        bad = {"cfg": {"fn": len, "ok": 1, "deep": [1, {"x": object()}]}, "t": torch.zeros(1)}
        ckpt.save(bad, str(tmp_path / "b"))
    lines = str(raised.value).splitlines()
    assert lines[0].startswith("2 problem(s)")
    assert any(line.strip().startswith("cfg.fn: builtins.builtin_function_or_method") for line in lines)
    assert any(line.strip().startswith("cfg.deep.1.x: builtins.object") for line in lines)
    with pytest.raises(UnsupportedValueError, match=r"x\.1: key \(2, 3\) must be a str or int"):
        ckpt.save({"x": [torch.zeros(1), {(2, 3): torch.zeros(1)}]}, str(tmp_path / "c"))
    with pytest.raises(UnsupportedValueError, match=r"a\.b: \['a\.b'\] and \['a'\]\['b'\] both flatten to this key"):
        ckpt.save({"a.b": torch.zeros(1), "a": {"b": torch.zeros(1)}}, str(tmp_path / "d"))
    with pytest.raises(UnsupportedValueError, match="sparse|Sparse"):
        ckpt.save({"s": torch.eye(3).to_sparse()}, str(tmp_path / "e"))
    for name in "abcde":
        assert not (tmp_path / name / MANIFEST).exists()


@pytest.fixture
def simple(tmp_path):
    src = {"a": random_tensor((4, 5), torch.float32, 20), "b": random_tensor((3,), torch.int64, 21), "lr": 0.5, "k": 1}
    path = str(tmp_path / "c")
    ckpt.save(src, path)
    return path, src


def test_strict_load_lists_every_problem_and_changes_nothing(simple):
    path, src = simple
    dst = {
        "a": torch.zeros(5, 4),  # shape
        "b": torch.zeros(3, dtype=torch.int32),  # dtype
        "lr": torch.zeros(1),  # a tensor where a value was saved
        "extra": torch.zeros(2),  # missing from checkpoint
        "extra_value": 3,  # missing from checkpoint
    }  # and "k" is unexpected
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in dst.items()}
    with pytest.raises(StateDictMismatchError) as ei:
        ckpt.load(dst, path)
    problems = ei.value.problems
    assert len(problems) == 6, problems
    text = "\n".join(problems)
    for needle in (
        r"a: shape \[5, 4\] here, \[4, 5\]",
        r"b: dtype torch.int32 here, torch.int64",
        r"lr: the checkpoint holds a value",
        r"extra: missing",
        r"extra_value: missing",
        r"k: in the checkpoint but not in the state dict",
    ):
        assert re.search(needle, text), (needle, text)
    assert str(len(problems)) in str(ei.value)
    for k, v in before.items():
        assert torch.equal(dst[k], v) if isinstance(v, torch.Tensor) else dst[k] == v


def test_non_strict_partial_load_leaves_missing_untouched(simple):
    path, src = simple
    dst = {"a": torch.zeros(4, 5), "extra": torch.full((2,), 9.0), "extra_value": "keep", "lr": 0.0}
    ckpt.load(dst, path, strict=False)
    assert_bitwise(dst["a"], src["a"])
    assert dst["lr"] == 0.5
    assert torch.equal(dst["extra"], torch.full((2,), 9.0)) and dst["extra_value"] == "keep"
    # shape mismatches are errors even when not strict
    with pytest.raises(StateDictMismatchError, match=r"a: shape"):
        ckpt.load({"a": torch.zeros(2)}, path, strict=False)


def test_allow_dtype_cast(simple):
    path, src = simple
    with pytest.raises(StateDictMismatchError, match="allow_dtype_cast"):
        ckpt.load({"a": torch.zeros(4, 5, dtype=torch.bfloat16)}, path, strict=False)
    dst = {"a": torch.zeros(4, 5, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float32)}
    ckpt.load(dst, path, strict=False, allow_dtype_cast=True)
    assert_bitwise(dst["a"], src["a"].to(torch.float64))
    assert_bitwise(dst["b"], src["b"].to(torch.float32))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        ckpt.load({}, str(tmp_path / "nothing"))
    (tmp_path / "partial" / "data").mkdir(parents=True)
    with pytest.raises(CheckpointNotFoundError, match="uncommitted or partial"):
        ckpt.load({}, str(tmp_path / "partial"))
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_no_overwrite_by_default_and_checkpoint_intact(simple):
    path, src = simple
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        ckpt.save({"a": torch.zeros(4, 5)}, path)
    dst = {"a": torch.zeros(4, 5), "b": torch.zeros(3, dtype=torch.int64), "lr": 0, "k": 0}
    ckpt.load(dst, path)
    assert_bitwise(dst["a"], src["a"])
    assert dst["lr"] == 0.5


def test_overwrite_replaces_and_removes_old_objects(simple):
    path, _ = simple
    old_objects = set(manifest_of(path).objects)
    new = {"z": random_tensor((8,), torch.float16, 22)}
    ckpt.save(new, path, options=SaveOptions(overwrite=True))
    m = manifest_of(path)
    assert set(m.tensors) == {"z"} and not set(m.objects) & old_objects
    on_disk = {f"data/{n}" for n in os.listdir(os.path.join(path, "data"))}
    assert on_disk == set(m.objects)
    assert not os.path.exists(os.path.join(path, "_staging"))
    dst = {"z": torch.zeros(8, dtype=torch.float16)}
    ckpt.load(dst, path)
    assert_bitwise(dst["z"], new["z"])


class _Boom(OSError):
    pass


@contextmanager
def _fail_writes_after(monkeypatch, limit: int):
    """Data-object writes raise once ``limit`` bytes went through (a disk/network failure)."""
    real = LocalStorage.open_write

    class Failing:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, buf):
            room = limit - self.n
            if len(buf) > room:
                if room > 0:
                    self.f.write(buf[:room])
                    self.n = limit
                raise _Boom("injected write failure")
            self.n += len(buf)
            return self.f.write(buf)

    @contextmanager
    def open_write(self, rel):
        with real(self, rel) as f:
            yield Failing(f)

    monkeypatch.setattr(LocalStorage, "open_write", open_write)
    try:
        yield
    finally:
        monkeypatch.setattr(LocalStorage, "open_write", real)


def test_failed_save_leaves_previous_checkpoint_intact(simple, monkeypatch, tmp_path):
    path, src = simple
    before = {n: open(os.path.join(path, n), "rb").read() for n in [MANIFEST, *manifest_of(path).objects]}
    new = {"a": torch.zeros(4, 5), "b": torch.zeros(3, dtype=torch.int64), "lr": 9.0, "k": 9}
    with _fail_writes_after(monkeypatch, 100), pytest.raises(_Boom):
        ckpt.save(new, path, options=SaveOptions(overwrite=True))
    after = {n: open(os.path.join(path, n), "rb").read() for n in before}
    assert after == before
    dst = {"a": torch.ones(4, 5), "b": torch.ones(3, dtype=torch.int64), "lr": 0, "k": 0}
    ckpt.load(dst, path)
    assert_bitwise(dst["a"], src["a"])
    assert_bitwise(dst["b"], src["b"])
    assert dst["lr"] == 0.5

    fresh = str(tmp_path / "fresh")
    with _fail_writes_after(monkeypatch, 100), pytest.raises(_Boom):
        ckpt.save(new, fresh)
    with pytest.raises(CheckpointNotFoundError):
        ckpt.load(new, fresh)
    # a later save to the same place succeeds and is complete
    ckpt.save(new, fresh)
    got = {"a": torch.ones(4, 5), "b": torch.ones(3, dtype=torch.int64), "lr": 0, "k": 0}
    ckpt.load(got, fresh)
    assert torch.equal(got["a"], new["a"]) and got["lr"] == 9.0


# ---------------------------------------------------------------- corruption


def test_flipped_byte_is_caught_naming_object_key_and_range(tmp_path):
    src = {"w": random_tensor((50, 40), torch.float32, 30), "v": random_tensor((10,), torch.float32, 31)}
    path = str(tmp_path / "c")
    ckpt.save(src, path, options=SaveOptions(chunk_bytes=2048, block_bytes=256))
    rec = manifest_of(path).tensors["w"]
    chunk = rec.chunks[2]
    at = chunk.offset + 300
    flip_bits(os.path.join(path, chunk.object), at, 0x10)
    with pytest.raises(CorruptChunkError) as ei:
        ckpt.load({k: torch.zeros_like(v) for k, v in src.items()}, path)
    msg = str(ei.value)
    assert chunk.object in msg and " w chunk " in msg, msg
    lo, hi = map(int, re.search(r"bytes \[(\d+), (\d+)\)", msg).groups())
    assert lo <= at < hi and hi - lo <= 256
    # a region that does not touch the damaged block still loads
    ok = torch.zeros(10, 40)
    ckpt.load({"w": Sharded.box(ok, (50, 40), (40, 0))}, path, strict=False)
    assert_bitwise(ok, src["w"][40:])
    # verify=False trusts the bytes: exactly one element differs
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    ckpt.load(dst, path, options=LoadOptions(verify=False))
    assert (bits(dst["w"]) != bits(src["w"])).sum() == 1


def test_truncated_object_is_a_clear_error(tmp_path):
    src = {"w": random_tensor((64, 64), torch.float32, 32)}
    path = str(tmp_path / "c")
    ckpt.save(src, path, options=SaveOptions(chunk_bytes=4096, block_bytes=1024))
    obj = next(iter(manifest_of(path).objects))
    size = os.path.getsize(os.path.join(path, obj))
    os.truncate(os.path.join(path, obj), size - 1000)
    with pytest.raises(ckpt.CheckpointFormatError) as ei:  # a CheckpointError, and an EOFError
        ckpt.load({"w": torch.zeros(64, 64)}, path)
    msg = str(ei.value)
    assert obj in msg and str(size - 1000) in msg, msg


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # cut short
        lambda raw: b"\x00\xff" + raw,  # not text
        lambda raw: json.dumps({"format": "other"}).encode(),
        lambda raw: raw.replace(b'"version":2', b'"version":99'),
        lambda raw: raw.replace(b'"block_bytes":4194304', b'"block_bytes":64'),  # checksum counts wrong
        lambda raw: raw.replace(b'"tensors":', b'"tensorz":'),
    ],
    ids=["truncated", "binary", "foreign", "version", "checksums", "missing-field"],
)
def test_damaged_manifest_names_the_file(simple, damage):
    path, _ = simple
    mpath = os.path.join(path, MANIFEST)
    raw = open(mpath, "rb").read()
    damaged = damage(raw)
    assert damaged != raw
    open(mpath, "wb").write(damaged)
    with pytest.raises(CheckpointFormatError, match=re.escape(os.path.join(path, MANIFEST))):
        ckpt.load({}, path, strict=False)


def test_manifest_with_chunk_outside_its_object_is_refused(simple):
    path, _ = simple

    def shrink(doc):
        doc["objects"][next(iter(doc["objects"]))] = 10

    edit_manifest(path, shrink)
    with pytest.raises(CheckpointFormatError, match="outside object"):
        ckpt.load({}, path, strict=False)


def test_manifest_with_missing_chunk_is_refused(simple):
    path, _ = simple
    edit_manifest(path, lambda doc: doc["tensors"]["a"].update(chunks=[]))
    with pytest.raises(CheckpointFormatError, match=r"a: chunks cover 0 of 20"):
        ckpt.load({}, path, strict=False)


def test_a_value_inside_a_tuple_is_refused_before_anything_is_read(tmp_path):
    path = str(tmp_path / "c")
    ckpt.save({"t": [torch.ones(3), 5]}, path)
    target = {"t": (torch.zeros(3), 0)}
    with pytest.raises(StateDictMismatchError, match=r"t\.1: a value inside a tuple"):
        ckpt.load(target, path)
    assert torch.equal(target["t"][0], torch.zeros(3)), "a tensor was loaded before the refusal"
