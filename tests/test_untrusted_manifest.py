"""A checkpoint is untrusted input: a crafted manifest must not reach outside it."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckpt


@pytest.mark.parametrize("name", ["../secret.safetensors", "/etc/passwd", "data/../../x", "s3://elsewhere/x", "a//b"])
def test_object_paths_outside_the_checkpoint_are_refused(tmp_path, name):
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"\0" * 4096)
    uri = str(tmp_path / "c")
    ckpt.save({"w": torch.ones(4)}, uri)
    manifest_path = os.path.join(uri, "manifest.json")
    with open(manifest_path) as f:
        doc = json.load(f)
    old = next(iter(doc["objects"]))
    doc["objects"] = {name: 4096}
    for chunk in doc["tensors"]["w"]["chunks"]:
        assert chunk["object"] == old
        chunk["object"] = name
    with open(manifest_path, "w") as f:
        json.dump(doc, f)
    with pytest.raises(ckpt.CheckpointFormatError, match="not a path inside the checkpoint"):
        ckpt.load({"w": torch.zeros(4)}, uri)


def test_load_leaves_the_callers_options_alone(tmp_path):
    uri = str(tmp_path / "c")
    ckpt.save({"w": torch.ones(4), "extra": 1}, uri)
    opts = ckpt.LoadOptions()
    ckpt.load({"w": torch.zeros(4)}, uri, strict=False, options=opts)
    assert opts.strict is True
    with pytest.raises(ckpt.StateDictMismatchError, match="extra"):
        ckpt.load({"w": torch.zeros(4)}, uri, options=opts)
