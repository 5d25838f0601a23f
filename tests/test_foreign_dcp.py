"""Megatron-Core torch_dist and ByteCheckpoint checkpoints (fixtures from tests/fixtures/foreign/make_fixtures.py)
read without their libraries and without running code, compared with the references the generator wrote."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import ckpt
from ckpt.interop import DcpSource, detect_format, open_source
from ckpt.interop.convert import convert
from ckpt.interop.safe_pickle import UnsafePickleError
from ckpt.interop.source import ForeignFormatError
from ckpt.reader import CheckpointReader
from ckpt.regions import Box

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "foreign")
CASES = {
    "megatron_torch_dist": ("megatron", "megatron_torch_dist"),
    "bytecheckpoint_ddp": ("bytecheckpoint", "bytecheckpoint_ddp/global_step_5"),
    "bytecheckpoint_fsdp2": ("bytecheckpoint", "bytecheckpoint_fsdp2/global_step_5"),
    "bytecheckpoint_fsdp": ("bytecheckpoint", "bytecheckpoint_fsdp/global_step_5"),
}


def _refs(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    base = os.path.join(FIXTURES, name)
    with open(os.path.join(base, "reference.json")) as f:
        return load_file(os.path.join(base, "reference.safetensors")), json.load(f)


@pytest.mark.parametrize("name", list(CASES))
def test_every_tensor_and_value_matches_the_reference(name):
    fmt, rel = CASES[name]
    tensors, values = _refs(name)
    uri = os.path.join(FIXTURES, rel)
    assert detect_format(uri) == fmt
    with open_source(uri) as src:
        assert set(src.tensors()) == set(tensors)
        for key, want in tensors.items():
            got = src.read(key)
            assert got.dtype == want.dtype and torch.equal(got, want), key
        assert src.values() == values


def test_megatron_regions_across_tp_and_pipeline_chunks():
    tensors, _ = _refs("megatron_torch_dist")
    with open_source(os.path.join(FIXTURES, "megatron_torch_dist")) as src:
        key = "decoder.layers.self_attention.linear_qkv.weight"  # 4 chunks: 2 stages x 2 TP ranks
        box = Box((1, 4, 2), (2, 5, 3))  # straddles all four
        assert torch.equal(src.read(key, box), tensors[key][1:3, 4:9, 2:5])
        assert src.info().step == 5


def test_dcp_reader_refuses_what_the_record_reader_reads():
    """DCP's own metadata classes only: Megatron's plans in planner_data are refused, naming the class."""
    with pytest.raises(ForeignFormatError, match="torch.distributed.checkpoint.planner.SavePlan"):
        DcpSource(os.path.join(FIXTURES, "megatron_torch_dist", "iter_0000005"))


@pytest.mark.parametrize("name", ["megatron_torch_dist", "bytecheckpoint_fsdp2"])
def test_load_into_another_layout_and_convert(name, tmp_path):
    from ckpt import Sharded

    fmt, rel = CASES[name]
    tensors, _ = _refs(name)
    uri = os.path.join(FIXTURES, rel)
    key = "optimizer.state.fp32_param.embedding.word_embeddings.weight" if fmt == "megatron" else "model.head.weight"
    full = tensors[key]
    # a flat range of the tensor, as a ZeRO-style partition would hold it, and a column block
    flat = torch.zeros(full.numel() // 2 + 3, dtype=full.dtype)
    col = torch.zeros(full.shape[0], 2, dtype=full.dtype)
    state = {"a": Sharded.flat(flat, full.shape, 5), "b": Sharded.box(col, full.shape, (0, 1))}
    ckpt.load({key: state["a"]}, uri, strict=False)
    assert torch.equal(flat, full.flatten()[5 : 5 + flat.numel()])
    ckpt.load({key: state["b"]}, uri, strict=False)
    assert torch.equal(col, full[:, 1:3])
    with open_source(uri) as src:
        convert(src, str(tmp_path / "c"))
    back = CheckpointReader(str(tmp_path / "c"))
    for k, want in tensors.items():
        assert torch.equal(back.read(k), want), k


def test_hostile_metadata_is_refused(tmp_path):
    src = os.path.join(FIXTURES, "bytecheckpoint_ddp", "global_step_5")
    shutil.copytree(src, tmp_path / "s")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/ran",))

    import pickle

    (tmp_path / "s" / "model" / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": Evil()}))
    with pytest.raises(UnsafePickleError, match=r"model/\.metadata.*posix\.system"):
        open_source(str(tmp_path / "s"))
    assert not (tmp_path / "ran").exists()


def test_fsdp_flat_parameter_is_split_into_the_original_ones():
    """ByteCheckpoint's FSDP (1) flat parameter: a region of an original parameter that straddles the two
    ranks' halves of the flat one reads as the same region of the reference."""
    tensors, _ = _refs("bytecheckpoint_fsdp")
    with open_source(os.path.join(FIXTURES, "bytecheckpoint_fsdp", "global_step_5")) as src:
        key = "model._fsdp_wrapped_module.layers.0.weight"  # flat elements [0, 35); the halves meet at 33
        assert torch.equal(src.read(key, Box((5, 1), (2, 3))), tensors[key][5:7, 1:4])
        assert "model._fsdp_wrapped_module._flat_param" not in src.tensors()
