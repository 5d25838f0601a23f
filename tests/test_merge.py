"""ckpt.merge on real checkpoints: exact maths across chunkings and topologies, outputs, errors."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import pytest
import torch
from dist import run_ranks
from helpers import assert_bitwise, read_all
from safetensors import safe_open
from safetensors.torch import load_file

import ckpt
from ckpt import SaveOptions, Sharded
from ckpt.cli import main as cli_main
from ckpt.cli.merge import register
from ckpt.errors import CorruptChunkError
from ckpt.merge import MergeError, SourceMismatchError, WeightError
from ckpt.reader import CheckpointReader
from ckpt.writer import CheckpointWriter

driver = sys.modules["ckpt.merge.driver"]  # ckpt.merge is the function; its modules live in sys.modules

SHAPES = {"emb": (50, 24), "w": (6, 7, 11), "b": (13,), "s": ()}


def model(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for k, shape in SHAPES.items()}


def state(seed: int, dtype: torch.dtype = torch.float32) -> dict:
    return {"model": model(seed, dtype), "opt": {"count": torch.tensor([seed, 7 * seed])}, "epoch": seed, "tag": "r"}


def flat(sd_model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in sd_model.items()}


def _save_two_ranks(rank: int, world: int, path: str, seed: int) -> None:
    """A TP-style row split of `emb`, a ZeRO-style flat split of `w`, the rest replicated."""
    full = model(seed)
    emb, w = full["emb"], full["w"]
    rows = [(0, 20), (20, 50)][rank]
    flat_w = w.reshape(-1)
    cut = [(0, 200), (200, w.numel())][rank]
    sd = {
        "model": {
            "emb": Sharded.box(emb[rows[0] : rows[1]].clone(), emb.shape, (rows[0], 0)),
            "w": Sharded.flat(flat_w[cut[0] : cut[1]].clone(), w.shape, cut[0]),
            "b": full["b"],
            "s": full["s"],
        },
        "opt": {"count": torch.tensor([seed, 7 * seed])},
        "epoch": seed,
        "tag": "r",
    }
    ckpt.save(sd, path, step=seed * 100, metrics={"loss": 1.0 / (seed + 1)}, options=SaveOptions(chunk_bytes=256))


def _write_offline(path: str, seed: int, chunk_bytes: int) -> None:
    sd = state(seed)
    with CheckpointWriter(path, SaveOptions(chunk_bytes=chunk_bytes)) as w:
        for k, v in flat(sd["model"]).items():
            w.write_tensor(k, v)
        w.write_tensor("opt.count", sd["opt"]["count"])
        w.set_value("epoch", sd["epoch"])
        w.set_value("tag", sd["tag"])
        w.commit(step=seed * 100, metrics={"loss": 1.0 / (seed + 1)})


@pytest.fixture(scope="module")
def mixed_sources(tmp_path_factory) -> list[str]:
    """Four checkpoints of one model family, each stored differently."""
    d = tmp_path_factory.mktemp("mixed")
    paths = [str(d / f"c{i}") for i in range(4)]
    ckpt.save(state(0), paths[0], step=0, metrics={"loss": 1.0})  # default chunking
    ckpt.save(state(1), paths[1], step=100, metrics={"loss": 0.5}, options=SaveOptions(chunk_bytes=100))
    _write_offline(paths[2], 2, chunk_bytes=333)
    run_ranks(_save_two_ranks, 2, paths[3], 3)
    return paths


def expected(weights: dict[int, float], dtype=torch.float64) -> dict[str, torch.Tensor]:
    out = {}
    for k in SHAPES:
        out[f"model.{k}"] = sum(w * model(seed)[k].to(torch.float64) for seed, w in weights.items()).to(dtype)
    return out


@pytest.mark.dist
def test_sources_chunked_and_sharded_differently_merge_exactly(mixed_sources, tmp_path):
    weights = [0.1, 0.2, 0.3, 0.4]
    out = str(tmp_path / "m")
    r = ckpt.merge(mixed_sources, out, "explicit", weights=weights, work_bytes=64, chunk_bytes=200, prefetch_bytes=300)
    assert r.weights == dict(zip(mixed_sources, weights))
    got = read_all(out)
    for k, exp in expected(dict(enumerate(weights))).items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), exp, rtol=1e-6, atol=1e-6, msg=k)
    # non-floating tensors and values come from the latest source (highest step: c3)
    assert torch.equal(got["opt.count"], torch.tensor([3, 21]))
    reader = CheckpointReader(out)
    assert reader.values == {"epoch": 3, "tag": "r"}
    assert reader.manifest.step == 300
    rec = reader.manifest.metadata["merge"]
    assert rec["method"] == "explicit" and rec["base"] == mixed_sources[3]
    assert [s["weight"] for s in rec["sources"]] == weights
    assert [s["step"] for s in rec["sources"]] == [0, 100, 200, 300]


@pytest.mark.dist
def test_result_does_not_depend_on_source_order(mixed_sources, tmp_path):
    fwd = str(tmp_path / "fwd")
    rev = str(tmp_path / "rev")
    ckpt.merge(mixed_sources, fwd, "explicit", weights=[0.7, 0.1, 0.15, 0.05], work_bytes=128)
    ckpt.merge(mixed_sources[::-1], rev, "explicit", weights=[0.05, 0.15, 0.1, 0.7], work_bytes=1 << 20)
    a, b = read_all(fwd), read_all(rev)
    assert a.keys() == b.keys()
    for k in a:
        assert_bitwise(a[k], b[k], k)


def _special(dtype: torch.dtype) -> torch.Tensor:
    vals = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -3.5, 1.0 / 3.0], dtype=torch.float64)
    return torch.cat([vals.to(dtype), torch.randn(992, generator=torch.Generator().manual_seed(5)).to(dtype)])


@pytest.mark.parametrize("method,opts", [("uniform", {}), ("mwa", {"metric": "loss", "penalty": 3.0}), ("ema", {})])
def test_identical_checkpoints_merge_to_themselves_bitwise(tmp_path, method, opts):
    sd = {f"t.{dt}".replace("torch.", ""): _special(dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}
    sd["t.f64"] = _special(torch.float64).view(25, 40)
    paths = []
    for i, chunk in enumerate((1 << 20, 96, 1000)):
        p = str(tmp_path / f"same{i}")
        ckpt.save(sd, p, step=i, metrics={"loss": 1.0 + i}, options=SaveOptions(chunk_bytes=chunk))
        paths.append(p)
    out = str(tmp_path / "out")
    ckpt.merge(paths, out, method, work_bytes=512, chunk_bytes=700, **opts)
    got = read_all(out)
    for k, v in sd.items():
        assert_bitwise(got[k], v, k)


def test_frozen_tensors_stay_bitwise_while_others_average(tmp_path):
    frozen = torch.randn(300, generator=torch.Generator().manual_seed(0))
    paths = []
    for i in range(3):
        p = str(tmp_path / f"c{i}")
        ckpt.save({"frozen": frozen, "lora": torch.full((40,), float(i))}, p, step=i)
        paths.append(p)
    ckpt.merge(paths, str(tmp_path / "o"), "uniform")
    got = read_all(str(tmp_path / "o"))
    assert_bitwise(got["frozen"], frozen)
    assert torch.equal(got["lora"], torch.full((40,), 1.0))


def test_output_dtype_and_fp64_accumulation(tmp_path):
    paths = []
    for i in range(3):
        p = str(tmp_path / f"c{i}")
        ckpt.save({"a": model(i)["emb"], "d": model(i, torch.float64)["w"]}, p, step=i)
        paths.append(p)
    w = [0.2, 0.3, 0.5]
    exp_a = sum(wi * model(i)["emb"].double() for i, wi in enumerate(w))
    exp_d = sum(wi * model(i, torch.float64)["w"] for i, wi in enumerate(w))
    ckpt.merge(paths, str(tmp_path / "bf"), "explicit", weights=w, dtype="bf16")
    got = read_all(str(tmp_path / "bf"))
    assert got["a"].dtype == torch.bfloat16 and got["d"].dtype == torch.bfloat16
    torch.testing.assert_close(got["a"], exp_a.to(torch.bfloat16), rtol=2**-7, atol=1e-6)
    ckpt.merge(paths, str(tmp_path / "keep"), "explicit", weights=w)
    got = read_all(str(tmp_path / "keep"))
    assert got["d"].dtype == torch.float64
    torch.testing.assert_close(got["d"], exp_d, rtol=1e-14, atol=1e-14)  # fp64 sources accumulate in fp64


@pytest.mark.dist
def test_base_include_exclude(mixed_sources, tmp_path):
    out = str(tmp_path / "o")
    ckpt.merge(mixed_sources, out, base=0, include=["model.*", "opt.*", "epoch"], exclude=["model.s"])
    r = CheckpointReader(out)
    assert r.keys() == ["model.b", "model.emb", "model.w", "opt.count"]
    assert r.values == {"epoch": 0}
    assert torch.equal(r.read("opt.count"), torch.tensor([0, 0]))
    assert r.manifest.step == 0


@pytest.mark.dist
def test_reads_stay_within_the_work_range(mixed_sources, tmp_path, monkeypatch):
    sizes = []
    real = driver.read_flat

    def spy(reader, key, start, stop, out=None):
        sizes.append((stop - start) * reader.record(key).dtype.itemsize)
        return real(reader, key, start, stop, out)

    monkeypatch.setattr(driver, "read_flat", spy)
    ckpt.merge(mixed_sources, str(tmp_path / "o"), work_bytes=256, chunk_bytes=1024)
    assert sizes and max(sizes) <= 256
    total = sum(math.prod(s) * 4 for s in SHAPES.values()) * 4 + 2 * 8  # 4 sources + opt.count (int64) of the base only
    assert sum(sizes) == total  # every element of every source read exactly once


@pytest.mark.dist
def test_mismatched_sources_are_named(mixed_sources, tmp_path):
    odd = str(tmp_path / "odd")
    sd = state(9)
    sd["model"]["emb"] = torch.zeros(51, 24)
    del sd["model"]["b"]
    sd["model"]["extra"] = torch.zeros(2)
    sd["opt"]["count"] = torch.zeros(2)
    ckpt.save(sd, odd, step=900)
    with pytest.raises(SourceMismatchError) as e:
        ckpt.merge([mixed_sources[0], odd], str(tmp_path / "o"))
    msg = str(e.value)
    assert f"model.b: {odd} does not have it" in msg
    assert f"model.extra: {mixed_sources[0]} does not have it" in msg
    assert f"model.emb: shapes differ: [50, 24] in {mixed_sources[0]}, [51, 24] in {odd}" in msg
    assert "opt.count: floating in some sources, not in others" in msg
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


@pytest.mark.dist
def test_weight_and_output_errors(mixed_sources, tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(WeightError, match="3 weights for 4 sources"):
        ckpt.merge(mixed_sources, out, "explicit", weights=[0.2, 0.3, 0.5])
    with pytest.raises(WeightError, match="not 1"):
        ckpt.merge(mixed_sources, out, "explicit", weights=[1, 1, 1, 1])
    with pytest.raises(WeightError, match="negative"):
        ckpt.merge(mixed_sources, out, "explicit", weights=[1.5, -0.5, 0, 0])
    with pytest.raises(MergeError, match="is one of the sources"):
        ckpt.merge(mixed_sources, mixed_sources[1])
    with pytest.raises(MergeError, match="given twice"):
        ckpt.merge([mixed_sources[0], mixed_sources[0] + "/"], out)
    with pytest.raises(ValueError, match="output_format"):
        ckpt.merge(mixed_sources, out, output_format="gguf")
    ckpt.merge(mixed_sources, out)
    with pytest.raises(ckpt.CheckpointExistsError):
        ckpt.merge(mixed_sources, out)
    ckpt.merge(mixed_sources, out, "explicit", weights=[0, 0, 0, 1], overwrite=True)
    assert torch.equal(read_all(out)["model.emb"], model(3)["emb"])


def test_corrupt_source_fails_and_commits_nothing(tmp_path):
    paths = []
    for i in range(2):
        p = str(tmp_path / f"c{i}")
        ckpt.save({"x": torch.randn(4096)}, p, step=i)
        paths.append(p)
    data = os.path.join(paths[1], "data")
    victim = os.path.join(data, os.listdir(data)[0])
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) - 100)
        f.write(b"\xff" * 8)
    out = str(tmp_path / "o")
    with pytest.raises(CorruptChunkError, match="do not match their checksum"):
        ckpt.merge(paths, out, work_bytes=1024)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(CorruptChunkError):
        ckpt.merge(paths, str(tmp_path / "hf"), output_format="hf", work_bytes=1024)
    assert not os.path.exists(tmp_path / "hf") or os.listdir(tmp_path / "hf") == []


@pytest.mark.dist
def test_hf_single_file_and_shards(mixed_sources, tmp_path):
    ref = str(tmp_path / "ref")
    ckpt.merge(mixed_sources, ref, "mwa", metric="loss", penalty=1.0)
    want = read_all(ref)

    single = tmp_path / "single"
    r = ckpt.merge(mixed_sources, str(single), "mwa", metric="loss", penalty=1.0, output_format="hf")
    assert r.files == ["model.safetensors"] and sorted(os.listdir(single)) == ["model.safetensors"]
    got = load_file(single / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert_bitwise(got[k], want[k], k)
    with safe_open(single / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert json.loads(meta["ckpt_values"]) == {"epoch": 3, "tag": "r"}
    assert json.loads(meta["ckpt_merge"])["method"] == "mwa"

    sharded = tmp_path / "sharded"
    limit = 2000
    r = ckpt.merge(
        mixed_sources, str(sharded), "mwa", metric="loss", penalty=1.0, output_format="hf", max_shard_bytes=limit
    )
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and r.files == shards
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in want.values())
    assert index["metadata"]["ckpt_values"] == {"epoch": 3, "tag": "r"}
    seen = {}
    for name in shards:
        part = load_file(sharded / name)
        size = sum(v.numel() * v.element_size() for v in part.values())
        assert size <= limit or len(part) == 1, name  # a tensor larger than the limit goes alone
        assert all(index["weight_map"][k] == name for k in part)
        seen.update(part)
    assert seen.keys() == want.keys()
    for k in want:
        assert_bitwise(seen[k], want[k], k)
    with pytest.raises(ckpt.CheckpointExistsError):
        ckpt.merge(mixed_sources, str(sharded), output_format="hf")
    # replacing a sharded model by a single file removes the index and the old shards
    ckpt.merge(mixed_sources, str(sharded), output_format="hf", overwrite=True)
    assert sorted(os.listdir(sharded)) == ["model.safetensors"]


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ckpt")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.mark.dist
def test_cli_handler(mixed_sources, tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = _cli(["merge", *mixed_sources, "-o", out, "--method", "mwa", "--metric", "loss", "--penalty", "2"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "merged 4 checkpoints (mwa)" in printed and mixed_sources[0] in printed
    rec = CheckpointReader(out).manifest.metadata["merge"]
    assert rec["metric"] == "loss" and rec["penalty"] == 2.0

    pattern = str(tmp_path / "glob*")
    for i in range(2):
        ckpt.save({"x": torch.full((3,), float(i))}, str(tmp_path / f"glob{i}"), step=i)
    args = _cli(["merge", pattern, "-o", str(tmp_path / "g"), "--method", "explicit", "--weights", "0.25,0.75"])
    assert args.func(args) == 0
    assert torch.equal(read_all(str(tmp_path / "g"))["x"], torch.full((3,), 0.75))

    # exit codes: what `ckpt merge` returns through the CLI's entry point
    explicit = ["--method", "explicit", "--weights", "1,2"]
    assert cli_main(["merge", *mixed_sources, "-o", str(tmp_path / "e"), *explicit]) == 2
    assert "2 weights for 4 sources" in capsys.readouterr().err
    assert cli_main(["merge", mixed_sources[0], str(tmp_path / "glob0"), "-o", str(tmp_path / "e")]) == 1
    assert "does not have it" in capsys.readouterr().err

    hf = tmp_path / "hfcli"
    argv = ["merge", *mixed_sources, "-o", str(hf), "--format", "hf", "--max-shard-size", "2kB", "--dtype", "bf16"]
    args = _cli(argv)
    assert args.func(args) == 0
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    merged = {}
    for name in set(index["weight_map"].values()):
        merged.update(load_file(hf / name))
    assert {k: v.dtype for k, v in merged.items()} == {
        **{f"model.{k}": torch.bfloat16 for k in SHAPES},
        "opt.count": torch.int64,  # not floating: copied from the base as it is
    }


@pytest.mark.dist
def test_cli_exit_codes_for_missing_sources_and_existing_outputs(mixed_sources, tmp_path, capsys):
    assert cli_main(["merge", mixed_sources[0], str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2
    assert "no committed checkpoint" in capsys.readouterr().err
    argv = ["merge", *mixed_sources, "-o", mixed_sources[0] + "-copy"]
    assert cli_main(argv) == 0
    assert cli_main(argv) == 2  # the output exists now
    assert "committed checkpoint exists" in capsys.readouterr().err


@pytest.mark.dist
def test_task_arithmetic_end_to_end(mixed_sources, tmp_path):
    out = str(tmp_path / "ta")
    r = ckpt.merge(mixed_sources, out, "task_arithmetic", pretrained=0, scale=0.5)
    assert list(r.weights.values()) == [-0.5, 0.5, 0.5, 0.5]
    got = read_all(out)
    for k, exp in expected({0: -0.5, 1: 0.5, 2: 0.5, 3: 0.5}).items():
        torch.testing.assert_close(got[k].double(), exp, rtol=1e-5, atol=1e-5, msg=k)
