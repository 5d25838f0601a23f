"""DeepSpeed checkpoints written by the real library on 2 CPU ranks, read in place and compared bitwise with
DeepSpeed's own full-state getters at save time (and with zero_to_fp32 / ds_to_universal afterwards)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")

from dist import run_ranks  # noqa: E402
from ds_train import CONFIGS, train_and_save  # noqa: E402

import ckpt  # noqa: E402
from ckpt.interop import DeepSpeedSource, detect_format, open_source  # noqa: E402
from ckpt.interop.safe_pickle import UnsafePickleError  # noqa: E402
from ckpt.interop.source import ForeignFormatError  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """Every config saved twice (tags step1, step2; latest = step2), and DeepSpeed's full state at each save."""
    root = tmp_path_factory.mktemp("ds")
    refs = run_ranks(train_and_save, 2, str(root), list(CONFIGS), timeout=900)[0]
    return root, refs


def _universal(src: str, dst: str) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src]
    cmd += ["--output_folder", dst, "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=600)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_tensor_matches_deepspeeds_own_full_state_bitwise(ds, config):
    root, refs = ds
    for tag in ("step1", "step2"):
        uri = str(root / config) if tag == "step2" else str(root / config / tag)  # the root reads `latest`
        assert detect_format(uri) == "deepspeed"
        with open_source(uri) as src:
            ref = refs[config][tag]
            for key, want in ref.items():
                got = src.read(key)
                assert got.dtype == want.dtype and torch.equal(got, want), (config, tag, key)
            # the tied output weight is DeepSpeed's shared parameter: the model's weights under both names
            assert torch.equal(src.read("model.head.weight"), ref["model.emb.weight"])
            assert set(src.tensors()) == set(ref) | {"model.head.weight"}
            values = src.values()
            step = int(tag[-1])
            assert values["deepspeed.epoch"] == step and values["deepspeed.note"] == config
            assert [g["weight_decay"] for g in values["optimizer.param_groups"]] == [0.1, 0.0]
            assert src.info().step == step


@pytest.mark.parametrize("config", [c for c in CONFIGS if c != "bf16_optimizer"])
def test_master_weights_match_zero_to_fp32(ds, config):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, _ = ds
    ref = get_fp32_state_dict_from_zero_checkpoint(str(root / config), tag="step2")
    with DeepSpeedSource(str(root / config)) as src:
        for name, t in ref.items():
            t = t.contiguous() if hasattr(t, "contiguous") else t
            owner = {"head.weight": "emb.weight"}.get(name, name)  # zero_to_fp32 repeats the tied weight
            key = f"fp32.{owner}" if f"fp32.{owner}" in src.tensors() else f"model.{name}"
            assert torch.equal(src.read(key), t), name


@pytest.mark.parametrize("config", ["z2_fp32", "bf16_optimizer"])
def test_universal_checkpoint_reads_like_the_zero_one(ds, config, tmp_path):
    root, refs = ds
    _universal(str(root / config / "step2"), str(tmp_path / "uni"))
    ref = refs[config]["step2"]
    with open_source(str(tmp_path / "uni")) as src:
        assert src.stage == "universal"
        for key, want in ref.items():
            if key.split(".")[0] in ("fp32", "exp_avg", "exp_avg_sq", "model"):
                assert torch.equal(src.read(key), want), key


def test_load_straight_into_another_layout(ds, tmp_path):
    """ckpt.load from the ZeRO-3 checkpoint into plain full tensors, and ckpt convert of it, agree bitwise."""
    root, refs = ds
    ref = refs["z3_bf16"]["step2"]
    target = {
        "model": {k[6:]: torch.zeros_like(v) for k, v in ref.items() if k.startswith("model.")},
        "fp32": {k[5:]: torch.zeros_like(v) for k, v in ref.items() if k.startswith("fp32.")},
        "exp_avg": {k[8:]: torch.zeros_like(v) for k, v in ref.items() if k.startswith("exp_avg.")},
    }
    ckpt.load(target, str(root / "z3_bf16"), strict=False)
    for group, entries in target.items():
        for name, t in entries.items():
            assert torch.equal(t, ref[f"{group}.{name}"]), (group, name)


def test_missing_rank_file_is_named(ds, tmp_path):
    root, _ = ds
    shutil.copytree(root / "z2_fp32" / "step2", tmp_path / "t")
    os.unlink(tmp_path / "t" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(ForeignFormatError, match="partition_count is 2 but 1 optimizer files"):
        DeepSpeedSource(str(tmp_path / "t"))


def test_hostile_optimizer_file_is_refused(ds, tmp_path):
    root, _ = ds
    shutil.copytree(root / "z1_fp32" / "step1", tmp_path / "t")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/ran",))

    torch.save({"optimizer_state_dict": {"x": Evil()}}, tmp_path / "t" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafePickleError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt.*posix\.system"):
        DeepSpeedSource(str(tmp_path / "t"))
    assert not (tmp_path / "ran").exists()


def test_root_without_latest_names_its_tags(ds, tmp_path):
    root, _ = ds
    shutil.copytree(root / "z1_fp32", tmp_path / "r")
    os.unlink(tmp_path / "r" / "latest")
    with pytest.raises(ForeignFormatError, match=r"step1, step2"):
        DeepSpeedSource(str(tmp_path / "r"))


def _load_as_dtensors(rank: int, world: int, uri: str, shapes: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    state = {
        kind: {n: distribute_tensor(torch.zeros(s), mesh, [Shard(len(s) - 1)]) for n, s in shapes.items()}
        for kind in ("fp32", "exp_avg_sq")
    }
    ckpt.load(state, uri, strict=False)
    return {f"{kind}.{n}": t.full_tensor() for kind, entries in state.items() for n, t in entries.items()}


def test_load_into_dtensors_on_another_world_size(ds):
    """Saved by 2 ZeRO-3 ranks, loaded by 3 ranks as DTensors sharded on their last dim."""
    root, refs = ds
    ref = refs["z3_fp32"]["step2"]
    shapes = {k[5:]: tuple(v.shape) for k, v in ref.items() if k.startswith("fp32.")}
    got = run_ranks(_load_as_dtensors, 3, str(root / "z3_fp32"), shapes, timeout=300)[0]
    for key, t in got.items():
        assert torch.equal(t, ref[key]), key
