"""The deny-by-default unpickler and lazy torch.save archives: no code runs, tensors read only what is asked."""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import types

import pytest
import torch

from ckpt.interop.safe_pickle import Record, UnsafePickleError, load_pickle, to_plain
from ckpt.interop.source import ForeignFormatError
from ckpt.interop.torchzip import open_archive
from ckpt.regions import Box
from ckpt.storage import LocalStorage


class _Shell:
    """Pickles as a call of os.system: loading it with plain pickle would run the command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').system('true')",))


def _hostile_cases(marker: str) -> dict[str, object]:
    return {
        "posix.system": _Shell(marker),
        "builtins.eval": _Eval(),
        "test_safe_pickle._Harmless": _Harmless(),
    }


class _Harmless:
    """An ordinary class the unpickler does not know: refused though harmless."""


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "test_safe_pickle._Harmless"])
def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, protocol, name):
    marker = tmp_path / "ran"
    raw = pickle.dumps({"state": [1, _hostile_cases(str(marker))[name]]}, protocol=protocol)
    with pytest.raises(UnsafePickleError) as e:
        load_pickle(raw, "evil.pkl")
    assert "evil.pkl" in str(e.value) and name in str(e.value)
    assert not marker.exists()


def test_hostile_object_inside_torch_save_is_refused_naming_file_and_class(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(3), "x": _Shell(str(marker))}, path)
    with pytest.raises(UnsafePickleError) as e:
        open_archive(str(path))
    assert str(path) in str(e.value) and "posix.system" in str(e.value)
    assert not marker.exists()


def test_foreign_class_becomes_a_record_and_its_code_never_runs(tmp_path, monkeypatch):
    """A stand-in with DeepSpeed's module/qualname: the pickle names the foreign class; reading it
    yields a record of its fields, and the stand-in's __setstate__ (a side effect) never runs."""
    ran = []
    mod = types.ModuleType("deepspeed.utils.tensor_fragment")

    class fragment_address:  # noqa: N801 - the foreign class's own name
        def __init__(self, numel, start):
            self.numel, self.start = numel, start

        def __setstate__(self, state):
            ran.append(state)
            self.__dict__.update(state)

    fragment_address.__module__, fragment_address.__qualname__ = mod.__name__, "fragment_address"
    mod.fragment_address = fragment_address
    for name in ("deepspeed", "deepspeed.utils"):  # stand-ins, so pickle finds the class without importing
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    raw = pickle.dumps({"m": collections.OrderedDict(w=fragment_address(12, 4))}, protocol=2)
    monkeypatch.undo()
    out = load_pickle(raw, "optim.pt")
    rec = out["m"]["w"]
    assert isinstance(rec, Record) and rec.cls == "deepspeed.utils.tensor_fragment.fragment_address"
    assert rec.fields == {"numel": 12, "start": 4}
    assert to_plain(out) == {"m": {"w": {"__class__": rec.cls, "numel": 12, "start": 4}}}
    assert ran == []


def test_codec_other_than_latin1_is_refused():
    class Rot:
        def __reduce__(self):
            return (__import__("_codecs").encode, ("abc", "rot13"))

    with pytest.raises(ForeignFormatError, match="rot13"):
        load_pickle(pickle.dumps(Rot(), protocol=2), "x.pkl")
    assert load_pickle(pickle.dumps(b"\x00\xffab", protocol=2), "x.pkl") == b"\x00\xffab"


def test_pickle_cannot_overwrite_a_lazy_tensors_fields(tmp_path):
    storage = torch.arange(4.0).untyped_storage()

    class Rebuild:
        def __reduce__(self):
            typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
            return (torch._utils._rebuild_tensor_v2, (typed, 0, (2,), (1,), False, collections.OrderedDict()), {"x": 1})

    torch.save({"t": Rebuild()}, tmp_path / "a.pt")
    with pytest.raises(ForeignFormatError, match="tried to set the state"):
        open_archive(str(tmp_path / "a.pt"))


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    storage = torch.arange(4.0).untyped_storage()

    class Rebuild:
        def __reduce__(self):
            typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
            return (torch._utils._rebuild_tensor_v2, (typed, 2, (3,), (1,), False, collections.OrderedDict()))

    torch.save({"t": Rebuild()}, tmp_path / "a.pt")
    with pytest.raises(ForeignFormatError, match=r"reaches element 4, the storage holds 4"):
        open_archive(str(tmp_path / "a.pt"))


def test_lazy_archive_reads_every_tensor_kind_bitwise(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    state = {
        "plain": torch.randn(5, 7, generator=g),
        "transposed": base.t(),  # non-contiguous: stride (1, 8)
        "view": base[2:4, 1:7],  # shares base's storage at an offset
        "base": base,
        "bf16": torch.randn(9, generator=g).to(torch.bfloat16),
        "int": torch.arange(10, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),
        "nested": {"list": [torch.ones(2, dtype=torch.int8), 7, "s", None, 2.5], "tuple": (1, 2)},
    }
    torch.save(state, tmp_path / "s.pt")
    ref = torch.load(tmp_path / "s.pt", weights_only=True)
    obj = open_archive(str(tmp_path / "s.pt")).obj
    for k in ("plain", "transposed", "view", "base", "bf16", "int", "scalar", "empty", "param"):
        got = obj[k].read()
        assert got.dtype == ref[k].dtype and torch.equal(got, ref[k].detach()), k
    assert torch.equal(obj["nested"]["list"][0].read(), ref["nested"]["list"][0])
    assert obj["nested"]["list"][1:] == [7, "s", None, 2.5] and obj["nested"]["tuple"] == (1, 2)
    box = Box((1, 2), (3, 4))
    assert torch.equal(obj["transposed"].read(box), ref["transposed"][1:4, 2:6])
    assert torch.equal(obj["view"].read(Box((1, 0), (1, 6))), ref["view"][1:2])


class _CountingStorage(LocalStorage):
    """A local Storage that counts the bytes it reads."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.bytes_read = 0

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        self.bytes_read += stop - start
        return super().read_range(rel, start, stop)

    def read_into_many(self, rel: str, start: int, bufs: list[memoryview]) -> None:
        self.bytes_read += sum(len(b) for b in bufs)
        super().read_into_many(rel, start, bufs)


def test_reading_one_region_reads_only_that_region(tmp_path):
    big = {f"layer{i}": torch.randn(256, 1024) for i in range(8)}  # 8 MiB
    torch.save(big, tmp_path / "big.pt")
    size = os.path.getsize(tmp_path / "big.pt")
    storage = _CountingStorage(str(tmp_path))
    from ckpt.interop.torchzip import TorchArchive

    arc = TorchArchive(storage, "big.pt")
    opened = storage.bytes_read
    assert opened < 200_000, opened  # central directory and data.pkl, read through a 64 KiB buffer
    rows = arc.obj["layer5"].read(Box((10, 0), (4, 1024)))
    assert torch.equal(rows, big["layer5"][10:14])
    assert storage.bytes_read - opened < 4 * 1024 * 4 + 64, storage.bytes_read - opened
    assert storage.bytes_read < size / 20


def test_not_a_zip_is_a_format_error(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(ForeignFormatError, match="x.pt"):
        open_archive(str(tmp_path / "x.pt"))
    buf = io.BytesIO()
    torch.save({"a": torch.ones(2)}, buf)
    (tmp_path / "t.pt").write_bytes(buf.getvalue()[:-200])  # cut through the central directory
    with pytest.raises(ForeignFormatError, match="t.pt"):
        open_archive(str(tmp_path / "t.pt"))


def test_numpy_rng_state_is_data_not_code():
    """Megatron keeps numpy's RNG state in a ShardedObject: the array comes back as a record with its raw bytes."""
    np = pytest.importorskip("numpy")
    state = np.random.RandomState(3).get_state()
    out = load_pickle(pickle.dumps(state, protocol=2), "rng.pkl")
    assert out[0] == "MT19937" and out[2:] == state[2:]
    arr = out[1]
    assert isinstance(arr, Record) and arr.cls.endswith("multiarray._reconstruct")
    assert arr.state[4] == state[1].tobytes()  # (version, shape, dtype, fortran, raw bytes)
