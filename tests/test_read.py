"""The stored structure and ``ckpt.read``: a checkpoint reads back as the nested structure it
was saved from (key types, order, lists and tuples), whole or by prefix, eagerly or lazily."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ckpt
from ckpt import Sharded, UnsupportedValueError
from ckpt.format import FORMAT_VERSION, MANIFEST, Manifest
from ckpt.structure import infer, leaves
from ckpt.tree import LazyDict
from ckpt.writer import CheckpointWriter


def rand(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def same(a, b) -> bool:
    """Deep equality with bitwise tensors and exact container types."""
    if type(a) is not type(b) and not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def training_state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),  # flat keys with dots inside one dict level
        "optim": opt.state_dict(),  # int state ids, tuple betas
        "pairs": [(rand(2, seed=1), rand(3, seed=2)), {"k": rand(1, seed=3)}],
        "z_first_then_a": {"z": 1, "a": 2},
        "step": 7,
    }


def test_read_returns_the_saved_structure_like_torch_load(tmp_path, training_state):
    path = str(tmp_path / "c")
    ckpt.save(training_state, path)
    got = ckpt.read(path)
    assert same(got, training_state)
    assert list(got["optim"]["state"]) == [0, 1, 2, 3]  # int keys, not "0"
    assert type(got["pairs"][0]) is tuple
    m = Manifest.from_json_bytes(open(f"{path}/{MANIFEST}", "rb").read(), path)
    assert m.version == FORMAT_VERSION == 2 and set(leaves(m.structure)) == set(m.tensors) | set(m.values)


def test_prefix_selection_device_and_dtype(tmp_path, training_state):
    path = str(tmp_path / "c")
    ckpt.save(training_state, path)
    got = ckpt.read(path, keys="model", dtype=torch.bfloat16)
    assert list(got) == ["model"] and list(got["model"]) == list(training_state["model"])
    assert all(t.dtype == torch.bfloat16 for t in got["model"].values())
    assert torch.equal(got["model"]["0.weight"], training_state["model"]["0.weight"].bfloat16())
    got = ckpt.read(path, keys=["optim.state.1", "step"], device="cpu")
    assert list(got) == ["optim", "step"] and list(got["optim"]["state"]) == [1] and got["step"] == 7
    assert got["optim"]["state"][1]["step"].dtype == torch.float32  # dtype only casts floats asked for
    with pytest.raises(KeyError, match="nothing stored under 'nope'"):
        ckpt.read(path, keys="nope")


def test_lazy_read_touches_only_what_is_accessed(tmp_path, training_state, monkeypatch):
    path = str(tmp_path / "c")
    ckpt.save(training_state, path)
    import ckpt.tree as tree

    read_keys = []
    original = tree.read_tensors
    monkeypatch.setattr(tree, "read_tensors", lambda s, m, t, o: (read_keys.extend(t), original(s, m, t, o))[1])
    lazy = ckpt.read(path, lazy=True)
    assert isinstance(lazy, LazyDict) and list(lazy) == list(training_state) and read_keys == []
    w = lazy["model"]["2.weight"]
    assert read_keys == ["model.2.weight"] and torch.equal(w, training_state["model"]["2.weight"])
    assert lazy["step"] == 7 and len(lazy["pairs"]) == 2 and torch.equal(lazy["pairs"][0][1], rand(3, seed=2))
    assert read_keys == ["model.2.weight", "pairs.0.1"]


def test_sharded_saves_read_back_whole_and_offline_writes_read_inferred(tmp_path):
    full = rand(6, 4, seed=5)
    local = torch.cat([full[3:], full[:3]])  # two boxes of the global tensor, swapped
    pieces = [((3, 0), (0, 0), (3, 4)), ((0, 0), (3, 0), (3, 4))]
    ckpt.save({"w": Sharded.pieces(local, (6, 4), pieces)}, str(tmp_path / "s"))
    assert same(ckpt.read(str(tmp_path / "s")), {"w": full})
    with CheckpointWriter(str(tmp_path / "c")) as w:  # no structure recorded: inferred from the keys
        w.write_tensor("m.w", full)
        w.set_value("m.n", 3)
        w.commit()
    assert same(ckpt.read(str(tmp_path / "c")), {"m": {"n": 3, "w": full}})  # inferred: sorted


def test_colliding_keys_are_refused_naming_both_paths(tmp_path):
    with pytest.raises(UnsupportedValueError) as raised:
        ckpt.save({"a.b": torch.zeros(1), "a": {"b": torch.zeros(1)}, "x": {"0": 1, 0: 2}}, str(tmp_path / "c"))
    text = str(raised.value)
    assert "a.b: ['a.b'] and ['a']['b'] both flatten to this key" in text
    assert "x.0: ['x']['0'] and ['x'][0] both flatten to this key" in text


def test_structure_distinguishes_dotted_keys_from_nesting(tmp_path):
    ckpt.save({"a.b": rand(2)}, str(tmp_path / "flat"))
    ckpt.save({"a": {"b": rand(2)}}, str(tmp_path / "nested"))
    assert list(ckpt.read(str(tmp_path / "flat"))) == ["a.b"]
    assert list(ckpt.read(str(tmp_path / "nested"))["a"]) == ["b"]


def test_version_1_checkpoints_still_load_and_read_with_an_inferred_structure(tmp_path):
    path = str(tmp_path / "c")
    ckpt.save({"model": {"w": rand(2, 2)}, "optim": {"state": {0: {"m": rand(2)}}}, "lr": 0.1}, path)
    doc = json.loads(open(f"{path}/{MANIFEST}").read())
    doc["version"] = 1
    del doc["structure"]
    doc["values"]["nan"] = math.nan  # version 1 wrote NaN tokens
    doc["values"]["tagged"] = {"$ckpt": "float", "value": "nan"}  # and had no tags: a plain dict
    open(f"{path}/{MANIFEST}", "w").write(json.dumps(doc))
    got = ckpt.read(path)
    assert list(got["optim"]["state"]) == [0] and torch.equal(got["model"]["w"], rand(2, 2))
    assert math.isnan(got["nan"]) and got["tagged"] == {"$ckpt": "float", "value": "nan"}
    target = {"model": {"w": torch.zeros(2, 2)}, "optim": {"state": {}}, "lr": 0.0, "nan": 0.0, "tagged": None}
    ckpt.load(target, path)
    assert torch.equal(target["optim"]["state"][0]["m"], rand(2)) and target["lr"] == 0.1


def test_infer_handles_a_leaf_that_is_also_a_prefix():
    node = infer(["a", "a.b", "c.0.d", "c.01"])
    assert sorted(leaves(node)) == ["a", "a.b", "c.0.d", "c.01"]


def test_reshard_and_convert_keep_the_structure(tmp_path, training_state):
    from ckpt.interop import CkptSource
    from ckpt.interop.convert import convert
    from ckpt.reshard import TargetLayout, reshard_for

    path = str(tmp_path / "c")
    ckpt.save(training_state, path, metrics={"loss": math.nan})
    with CkptSource(path) as src:
        convert(src, str(tmp_path / "converted"))
        reshard_for(src, str(tmp_path / "resharded"), TargetLayout(world=2, dim=0))
    for out in ("converted", "resharded"):
        got = ckpt.read(str(tmp_path / out))
        assert same(got, training_state), out
        assert list(got["optim"]["state"]) == [0, 1, 2, 3] and type(got["pairs"][0]) is tuple
        assert math.isnan(Manifest.from_json_bytes(open(tmp_path / out / MANIFEST, "rb").read(), out).metrics["loss"])
