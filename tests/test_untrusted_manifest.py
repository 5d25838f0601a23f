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


def _rewrite_manifest(uri: str, edit) -> None:
    path = os.path.join(uri, "manifest.json")
    with open(path) as f:
        doc = json.load(f)
    edit(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize("version", [3, 0, "1", 2.0, True, None])
def test_unknown_format_version_names_the_file_and_the_versions_read(tmp_path, version):
    uri = str(tmp_path / "c")
    ckpt.save({"w": torch.ones(4)}, uri)
    _rewrite_manifest(uri, lambda doc: doc.update(version=version))
    with pytest.raises(ckpt.CheckpointFormatError) as ei:
        ckpt.load({"w": torch.zeros(4)}, uri)
    msg = str(ei.value)
    assert os.path.join(uri, "manifest.json") in msg and f"format version {version!r}" in msg, msg
    assert "this library reads 1, 2" in msg, msg


def test_a_reader_for_a_new_version_sits_beside_the_old_ones(tmp_path, monkeypatch):
    """A v3 manifest (here: v2 with a renamed field) is read by the v3 reader once one is
    registered, and v2 checkpoints still go to the v2 reader."""
    from ckpt import format

    old, new = str(tmp_path / "v2"), str(tmp_path / "v3")
    ckpt.save({"w": torch.arange(4.0)}, old)
    ckpt.save({"w": torch.arange(4.0) + 10}, new)

    def to_v3(doc):
        doc["version"] = 3
        doc["tensor_records"] = doc.pop("tensors")

    _rewrite_manifest(new, to_v3)
    with pytest.raises(ckpt.CheckpointFormatError, match="format version 3 is not supported"):
        ckpt.load({"w": torch.zeros(4)}, new)

    def read_v3(doc, where):
        return format.read_v2({**doc, "tensors": doc["tensor_records"]}, where)

    monkeypatch.setitem(format.READERS, 3, read_v3)
    for uri, want in ((old, torch.arange(4.0)), (new, torch.arange(4.0) + 10)):
        target = {"w": torch.zeros(4)}
        ckpt.load(target, uri)
        assert torch.equal(target["w"], want)
    with pytest.raises(ckpt.CheckpointFormatError, match="this library reads 1, 2, 3"):
        _rewrite_manifest(old, lambda doc: doc.update(version=4))
        ckpt.load({"w": torch.zeros(4)}, old)
