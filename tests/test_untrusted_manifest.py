"""A checkpoint is untrusted input: a crafted manifest must not reach outside it."""

from __future__ import annotations

import os

import helpers
import pytest
import torch
from helpers import edit_manifest

import ckpt


@pytest.mark.parametrize("name", ["../secret.safetensors", "/etc/passwd", "data/../../x", "s3://elsewhere/x", "a//b"])
def test_object_paths_outside_the_checkpoint_are_refused(tmp_path, name):
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"\0" * 4096)
    uri = str(tmp_path / "c")
    ckpt.save({"w": torch.ones(4)}, uri)

    def redirect(doc):
        old = next(iter(doc["objects"]))
        doc["objects"] = {name: 4096}
        for chunk in doc["tensors"]["w"]["chunks"]:
            assert chunk["object"] == old
            chunk["object"] = name

    edit_manifest(uri, redirect)
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


@pytest.mark.parametrize("version", [3, 0, "1", 2.0, True, None])
def test_unknown_format_version_names_the_file_and_the_versions_read(tmp_path, version):
    uri = str(tmp_path / "c")
    ckpt.save({"w": torch.ones(4)}, uri)
    edit_manifest(uri, lambda doc: doc.update(version=version))
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

    edit_manifest(new, to_v3)
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
        edit_manifest(old, lambda doc: doc.update(version=4))
        ckpt.load({"w": torch.zeros(4)}, old)


def _two_chunk_checkpoint(tmp_path):
    """A (128, 8) float32 tensor in two chunks of 64 rows, the layout of the issue's one-digit edit."""
    uri = str(tmp_path / "c")
    want = torch.arange(128 * 8, dtype=torch.float32).reshape(128, 8)
    ckpt.save({"w": want}, uri, options=ckpt.SaveOptions(chunk_bytes=64 * 8 * 4, block_bytes=256))
    chunks = helpers.manifest_of(uri).tensors["w"].chunks
    assert [c.box.offsets for c in chunks] == [(0, 0), (64, 0)]
    return uri, want


def test_a_shifted_chunk_is_refused_on_load_and_by_verify(tmp_path):
    """Row offset 64 -> 63 (sealed again, as a buggy writer would): element counts still add up,
    but row 63 is covered twice and row 127 never. Load and verify must refuse, naming both."""
    uri, _ = _two_chunk_checkpoint(tmp_path)
    edit_manifest(uri, lambda doc: doc["tensors"]["w"]["chunks"][1].update(offsets=[63, 0]))
    target = {"w": torch.zeros(128, 8)}
    with pytest.raises(ckpt.CheckpointFormatError, match=r"w: chunks overlap at element \[63, 0\] \(chunk 0 .*chunk 1"):
        ckpt.load(target, uri)
    assert torch.equal(target["w"], torch.zeros(128, 8)), "data was copied from a manifest that does not tile"
    code, out, err = helpers.run_cli("verify", uri)
    assert code == 1 and "chunks overlap at element [63, 0]" in err, (code, out, err)


def test_overlapping_and_gapped_chunks_are_refused_at_any_chunk_count(tmp_path):
    """1000 chunks; one moves onto its neighbour's rows: a pairwise check capped at a chunk count would miss it."""
    uri = str(tmp_path / "c")
    ckpt.save({"w": torch.ones(1000, 4)}, uri, options=ckpt.SaveOptions(chunk_bytes=16, block_bytes=64))
    assert len(helpers.manifest_of(uri).tensors["w"].chunks) == 1000

    def move(doc):
        doc["tensors"]["w"]["chunks"][998]["offsets"] = [997, 0]

    edit_manifest(uri, move)
    with pytest.raises(ckpt.CheckpointFormatError, match=r"chunks overlap at element \[997, 0\]"):
        ckpt.load({"w": torch.zeros(1000, 4)}, uri)


def test_a_changed_manifest_fails_its_digest_naming_the_file(tmp_path):
    uri, _ = _two_chunk_checkpoint(tmp_path)
    path = os.path.join(uri, "manifest.json")
    raw = open(path, "rb").read()
    assert raw.rstrip(b"}").rsplit(b",", 1)[1].startswith(b'"digest":"sha256:')
    flipped = raw.replace(b'"step":null', b'"step":1')  # valid JSON, valid manifest, wrong bytes
    assert flipped != raw
    open(path, "wb").write(flipped)
    with pytest.raises(ckpt.CheckpointFormatError, match=rf"{path}: manifest digest mismatch"):
        ckpt.load({"w": torch.zeros(128, 8)}, uri)
    open(path, "wb").write(raw.replace(b",", b", "))  # same document, other bytes: not the text that was sealed
    code, _, err = helpers.run_cli("info", uri)
    assert code == 1 and "rewritten after it was sealed" in err and path in err, err
    open(path, "wb").write(raw)
    assert helpers.run_cli("info", uri)[0] == 0
    edit_manifest(uri, lambda doc: doc.pop("digest"), reseal=False)  # a version 2 manifest must carry one
    with pytest.raises(ckpt.CheckpointFormatError, match=rf"{path}: manifest digest null is not a sha256 digest"):
        ckpt.load({"w": torch.zeros(128, 8)}, uri)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("offset", "64", "offset must be an integer"),
        ("offset", True, "offset must be an integer"),
        ("offset", 1.0, "offset must be an integer"),
        ("offset", -8, "offset must be an integer"),
        ("offset", 2**64, "offset must be an integer"),
        ("length", None, "length must be an integer"),
        ("offsets", "ab", "offsets must be a list"),
        ("offsets", [0], "rank mismatch|outside shape"),
        ("sizes", [64, "8"], "sizes must be an integer"),
        ("object", 7, "object must be a JSON str"),
        ("checksums", [1], "a checksum must be a JSON str"),
        ("offset", 2, "not a multiple of its item size 4"),
    ],
)
def test_mistyped_chunk_fields_are_format_errors_naming_the_field(tmp_path, field, value, message):
    uri, _ = _two_chunk_checkpoint(tmp_path)
    edit_manifest(uri, lambda doc: doc["tensors"]["w"]["chunks"][1].update({field: value}))
    with pytest.raises(ckpt.CheckpointFormatError, match=message) as ei:
        ckpt.load({"w": torch.zeros(128, 8)}, uri)
    assert "manifest.json" in str(ei.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(block_bytes="4096"), "block_bytes must be an integer"),
        (lambda d: d.update(block_bytes=0), "block_bytes must be an integer in \\[1,"),
        (lambda d: d.update(objects=[]), "objects must be a JSON dict"),
        (lambda d: d["objects"].update({next(iter(d["objects"])): "99"}), "size of object"),
        (lambda d: d.update(step="7"), "step must be an integer"),
        (lambda d: d.update(metrics=[1.5]), "metrics must be a JSON dict"),
        (lambda d: d.update(created=5), "created must be a JSON str"),
        (lambda d: d.update(tensors={"w": []}), "tensor w: a tensor record must be a JSON dict"),
        (lambda d: d["tensors"]["w"].update(shape=[128, -8]), "shape must be an integer"),
        (lambda d: d["tensors"]["w"].update(dtype=["float32"]), "dtype must be a JSON str"),
        (lambda d: d["tensors"]["w"].pop("chunks"), "missing field 'chunks'"),
        (lambda d: d.update(values={"w": 1}), "w is both a tensor and a value"),
        (lambda d: d["tensors"]["w"].update(shape=[2**62, 8]), "too large"),
    ],
)
def test_mistyped_manifest_fields_are_format_errors(tmp_path, edit, message):
    uri, _ = _two_chunk_checkpoint(tmp_path)
    edit_manifest(uri, edit)
    with pytest.raises(ckpt.CheckpointFormatError, match=message):
        ckpt.load({"w": torch.zeros(128, 8)}, uri, strict=False)
