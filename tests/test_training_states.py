"""Training states round-trip without pickle: RNG states, numpy, Namespace, paths, and what
HF Trainer and Lightning put in their checkpoints; files are standard JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random

import numpy as np
import pytest
import torch

import ckpt
from ckpt import UnsupportedValueError
from ckpt.errors import CheckpointFormatError
from ckpt.format import MANIFEST
from ckpt.values import TAG, decode, encode_checked


def strict_json(raw: bytes | str):
    """Parse as standard JSON: NaN / Infinity tokens are an error."""

    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(raw, parse_constant=refuse)


def test_random_state_restores_and_setstate_works(tmp_path):
    random.seed(1234)
    state = {"python": random.getstate()}
    want = [random.random() for _ in range(5)]
    ckpt.save(state, str(tmp_path / "c"))
    target = {"python": None}
    ckpt.load(target, str(tmp_path / "c"))
    got = target["python"]
    assert got == state["python"] and type(got) is tuple and type(got[1]) is tuple
    random.seed(0)
    random.setstate(got)
    assert [random.random() for _ in range(5)] == want


def test_numpy_states_and_arrays_round_trip(tmp_path):
    np.random.seed(7)
    legacy = np.random.get_state()
    gen = np.random.default_rng(42)
    gen.random(3)
    arrays = {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "bool": np.array([True, False]),
        "empty": np.zeros((0, 5), dtype=np.float64),
        "scalar": np.float64(2.5),
        "big_endian": np.arange(4, dtype=">u4"),
    }
    state = {"legacy": legacy, "bitgen": gen.bit_generator.state, "gen": gen, "rs": np.random.RandomState(3), **arrays}
    ckpt.save(state, str(tmp_path / "c"))
    got = ckpt.read(str(tmp_path / "c"))
    np.random.set_state(got["legacy"])  # the consumer accepts it
    first = np.random.random(4)
    np.random.set_state(legacy)
    assert np.array_equal(first, np.random.random(4))
    assert got["bitgen"] == gen.bit_generator.state
    assert np.array_equal(got["gen"].random(4), gen.random(4))
    assert np.array_equal(got["rs"].random_sample(3), np.random.RandomState(3).random_sample(3))
    for k, want in arrays.items():
        assert type(got[k]) is type(want) and got[k].dtype == want.dtype and np.array_equal(got[k], want), k
    assert got["fortran"].shape == (2, 3)


def test_torch_generators_and_rng_states(tmp_path):
    g = torch.Generator().manual_seed(99)
    torch.rand(3, generator=g)
    state = {"gen": g, "cpu": torch.random.get_rng_state(), "dtype": torch.bfloat16, "device": torch.device("cpu")}
    ckpt.save(state, str(tmp_path / "c"))
    got = ckpt.read(str(tmp_path / "c"))
    assert torch.equal(torch.rand(5, generator=got["gen"]), torch.rand(5, generator=g))
    torch.random.set_rng_state(got["cpu"])  # a uint8 tensor, as torch returns it
    assert got["dtype"] is torch.bfloat16 and got["device"] == torch.device("cpu")


def test_namespace_and_paths(tmp_path):
    ns = argparse.Namespace(lr=3e-4, out=pathlib.Path("/runs/a"), tags=("x", "y"), nested={"k": 1})
    state = {
        "args": ns,
        "dir": pathlib.Path("rel/dir"),
        "pure": pathlib.PurePosixPath("/x/y"),
        "win": pathlib.PureWindowsPath("C:\\runs\\b"),
    }
    ckpt.save(state, str(tmp_path / "c"))
    got = ckpt.read(str(tmp_path / "c"))
    assert got["args"] == ns and type(got["args"].out) is type(ns.out) and type(got["args"].tags) is tuple
    assert got["dir"] == state["dir"] and isinstance(got["dir"], pathlib.Path)
    assert type(got["pure"]) is pathlib.PurePosixPath and type(got["win"]) is pathlib.PureWindowsPath
    assert got["win"] == state["win"]


def test_hf_trainer_rng_and_lightning_checkpoint_contents(tmp_path):
    """What HF Trainer writes to rng_state.pth / scheduler.pt / scaler.pt and a Lightning
    checkpoint dict holds, saved as one state and read back as the consumers need it."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    hf_rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    lightning = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": model.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                "best_model_score": torch.tensor(0.25),
                "best_model_path": "/ckpts/epoch=2.ckpt",
                "dirpath": pathlib.Path("/ckpts"),
                "best_k_models": {},
            }
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": argparse.Namespace(lr=1e-3, betas=(0.9, 0.999), data=pathlib.Path("data")),
    }
    state = {"rng": hf_rng, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}, "pl": lightning}
    ckpt.save(state, str(tmp_path / "c"))
    got = ckpt.read(str(tmp_path / "c"))
    random.setstate(got["rng"]["python"])
    np.random.set_state(got["rng"]["numpy"])
    torch.random.set_rng_state(got["rng"]["cpu"])
    pl = got["pl"]
    assert pl["hyper_parameters"] == lightning["hyper_parameters"]
    (name, cb), (want_name, want) = *pl["callbacks"].items(), *lightning["callbacks"].items()
    assert name == want_name and cb["dirpath"] == want["dirpath"] and cb["best_k_models"] == {}
    assert torch.equal(cb["best_model_score"], want["best_model_score"])
    assert pl["loops"] == lightning["loops"]
    assert list(pl) == list(lightning)  # order kept
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(pl["optimizer_states"][0])  # int state ids, tuple betas: accepted as saved
    assert fresh.param_groups[0]["betas"] == (0.9, 0.999)
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    torch.nn.Linear(3, 2).load_state_dict(pl["state_dict"])


def test_every_unsupported_value_is_listed_at_once(tmp_path):
    class Custom:
        pass

    state = {
        "a": Custom(),
        "b": [1, {"c": lambda: 0}],
        "d": np.array([object()], dtype=object),
        "ok": torch.zeros(2),
    }
    with pytest.raises(UnsupportedValueError) as raised:
        ckpt.save(state, str(tmp_path / "c"))
    text = str(raised.value)
    assert text.startswith("3 problem(s)")
    for needle in ("a: tests", "Custom", "b.1.c: builtins.function", "d: numpy arrays of dtype object"):
        assert needle in text.replace("test_training_states", "tests"), needle
    assert not os.path.exists(tmp_path / "c" / MANIFEST)


def test_manifest_and_values_are_standard_json_and_floats_round_trip(tmp_path):
    values = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "nested": [math.nan, {"x": math.inf}]}
    ckpt.save({"v": values, "t": torch.zeros(1)}, str(tmp_path / "c"), metrics={"loss": math.nan}, metadata=values)
    raw = open(tmp_path / "c" / MANIFEST, "rb").read()
    doc = strict_json(raw)
    assert doc["values"]["v.inf"] == {TAG: "float", "value": "inf"}
    got = ckpt.read(str(tmp_path / "c"))["v"]
    assert math.isnan(got["nan"]) and got["inf"] == math.inf and got["ninf"] == -math.inf
    assert math.isnan(got["nested"][0]) and got["nested"][1] == {"x": math.inf}
    m = ckpt.load({"v": {}, "t": torch.zeros(1)}, str(tmp_path / "c"))
    assert math.isnan(m.metrics["loss"]) and m.metadata["inf"] == math.inf


def test_user_dicts_that_look_like_tags_or_have_odd_keys_round_trip():
    tricky = {TAG: "float", "value": "nan"}
    value = {"tag": tricky, "int_keys": {0: "a", 1: "b"}, "mixed": {1: 1, "1": 2, (2, 3): 3, None: 4}}
    encoded = encode_checked(value, "v")
    json.dumps(encoded, allow_nan=False)
    got = decode(json.loads(json.dumps(encoded)))
    assert got == value and list(got["mixed"]) == [1, "1", (2, 3), None]


def test_unknown_or_malformed_tags_are_format_errors():
    with pytest.raises(CheckpointFormatError, match="unknown value type 'pickle'"):
        decode({TAG: "pickle", "data": "..."})
    with pytest.raises(CheckpointFormatError, match="malformed 'ndarray'"):
        decode({TAG: "ndarray", "dtype": "|O", "shape": [1], "base64": ""})
    with pytest.raises(CheckpointFormatError, match="malformed 'numpy.Generator'"):
        decode({TAG: "numpy.Generator", "state": {"bit_generator": "os.system", "state": {}}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_states_and_reads_onto_the_device(tmp_path):
    g = torch.Generator(device="cuda").manual_seed(5)
    torch.rand(3, device="cuda", generator=g)
    state = {"gen": g, "cuda": torch.cuda.get_rng_state_all(), "w": torch.arange(6.0, device="cuda")}
    ckpt.save(state, str(tmp_path / "c"))
    got = ckpt.read(str(tmp_path / "c"), device="cuda")
    assert got["gen"].device.type == "cuda" and got["w"].device.type == "cuda"
    assert torch.equal(torch.rand(4, device="cuda", generator=got["gen"]), torch.rand(4, device="cuda", generator=g))
    torch.cuda.set_rng_state_all(got["cuda"])  # a list of uint8 state tensors, as torch returns it
    target = {"w": torch.zeros(6, device="cuda"), "cuda": []}  # an empty list is filled on the target's device
    result = ckpt.load(target, str(tmp_path / "c"), partial=True)
    assert torch.equal(target["w"], state["w"]) and result.unexpected_keys == ["gen"]
    assert all(t.device.type == "cuda" and torch.equal(t.cpu(), s) for t, s in zip(target["cuda"], state["cuda"]))


@pytest.mark.parametrize("max_shard_bytes", [None, 64], ids=["one-file", "sharded"])
def test_hf_export_keeps_typed_values_as_standard_json(tmp_path, max_shard_bytes):
    from safetensors import safe_open

    from ckpt.interop import CkptSource, SafetensorsSource, export_safetensors

    values = {"betas": (0.9, 0.999), "best": math.inf, "args": argparse.Namespace(lr=0.1)}
    ckpt.save({"w": torch.arange(40.0), "v": values}, str(tmp_path / "c"))
    with CkptSource(str(tmp_path / "c")) as src:
        written = export_safetensors(src, str(tmp_path / "hf"), max_shard_bytes)
    for name in written:
        if name.endswith(".json"):
            strict_json(open(tmp_path / "hf" / name).read())
        else:
            with safe_open(str(tmp_path / "hf" / name), "pt") as f:
                strict_json((f.metadata() or {}).get("ckpt_values", "{}"))
    with SafetensorsSource(str(tmp_path / "hf")) as back:
        assert {k.removeprefix("v."): v for k, v in back.values().items()} == values
