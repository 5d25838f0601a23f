"""A checkpoint is untrusted input: a crafted manifest must not reach outside it."""

from __future__ import annotations

import math
import os

import helpers
import pytest
import torch
from helpers import edit_manifest

import ckpt
from ckpt.reader import CheckpointReader


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


def _object_of(uri: str) -> str:
    (obj,) = helpers.manifest_of(uri).objects
    return obj


def _plant(uri: str, obj: str, kind: str, outside: str) -> None:
    """Replace data object ``obj`` with a ``kind``: the object gone, a directory, a FIFO, a symlink to
    ``outside`` (a copy of the real object, so following it would even pass the checksums), or the data
    directory itself as a symlink to a copy of it outside."""
    path = os.path.join(uri, obj)
    if kind == "data-dir-link":
        os.rename(os.path.dirname(path), os.path.join(outside, "data"))
        os.symlink(os.path.join(outside, "data"), os.path.dirname(path))
        return
    os.rename(path, os.path.join(outside, "copy"))
    if kind == "directory":
        os.mkdir(path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        os.symlink(os.path.join(outside, "copy"), path)


@pytest.mark.parametrize(
    "kind, error, message",
    [
        ("deleted", ckpt.MissingObjectError, r"bytes \[\d+, \d+\) .*requested, but the object is gone"),
        ("directory", ckpt.UnsafeObjectError, "a directory, not a regular file"),
        ("fifo", ckpt.UnsafeObjectError, "a FIFO, not a regular file"),
        ("symlink", ckpt.UnsafeObjectError, r"\.safetensors is a symbolic link, not followed"),
        ("data-dir-link", ckpt.UnsafeObjectError, "data is a symbolic link, not followed"),
    ],
)
def test_a_data_object_that_is_not_a_regular_file_inside_is_a_typed_error(tmp_path, kind, error, message):
    """Nothing is read through a planted link (its target is a copy of the real object, so reading it
    would load "fine"), a FIFO does not hang the reader, and every tool reports the object by name."""
    uri, _ = _two_chunk_checkpoint(tmp_path)
    obj = _object_of(uri)
    outside = tmp_path / "outside"
    outside.mkdir()
    _plant(uri, obj, kind, str(outside))
    target = {"w": torch.zeros(128, 8)}
    with pytest.raises(error, match=message) as ei:
        ckpt.load(target, uri)
    assert obj in str(ei.value)
    assert not target["w"].any(), "bytes were copied from outside the checkpoint"
    with pytest.raises(error, match=message):
        CheckpointReader(uri).read("w")
    code, out, err = helpers.run_cli("verify", uri)
    assert code == 1 and "FAILED" in out and obj in out and error.__name__ in out, (out, err)


def test_verify_and_read_never_allocate_what_a_manifest_claims(tmp_path, monkeypatch):
    """A sealed manifest claiming a 64 GiB tensor in a 64 GiB object that really holds 4 KiB: the tools
    report the object short without asking for the memory."""
    uri, _ = _two_chunk_checkpoint(tmp_path)
    obj = _object_of(uri)
    rows = 1 << 31

    def inflate(doc):
        doc["objects"][obj] = 8 * rows * 4 * 2 + 4096
        rec = doc["tensors"]["w"]
        rec["shape"] = [rows, 8]
        doc["block_bytes"] = 1 << 40  # one checksum a chunk, so the manifest itself stays small
        first, second = rec["chunks"]
        second["sizes"] = [rows - 64, 8]
        second["length"] = (rows - 64) * 8 * 4
        for c in (first, second):
            c["checksums"] = c["checksums"][:1]

    edit_manifest(uri, inflate)
    real_empty = torch.empty

    def bounded_empty(*size, **kw):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        assert math.prod(shape) <= 1 << 24, f"asked for {list(shape)} elements for a manifest's claim"
        return real_empty(*size, **kw)

    monkeypatch.setattr(torch, "empty", bounded_empty)
    code, out, err = helpers.run_cli("verify", uri)
    assert code == 1 and "TruncatedObjectError" in out and obj in out and "object ends at" in out, (out, err)
    with pytest.raises(ckpt.TruncatedObjectError, match=r"object ends at \d+"):
        CheckpointReader(uri).read("w")


@pytest.mark.parametrize("damage", ["fifo-manifest", "directory-manifest", "garbage-manifest", "unreadable-dir"])
def test_one_damaged_checkpoint_never_breaks_ls_gc_or_restore_of_the_others(tmp_path, damage):
    root = tmp_path / "run"
    for step in (1, 2, 3):
        ckpt.save({"w": torch.full((4,), float(step))}, str(root / f"step-{step:08d}"), step=step)
    bad = root / "step-00000003"
    manifest = bad / "manifest.json"
    if damage == "fifo-manifest":
        manifest.unlink()
        os.mkfifo(manifest)
    elif damage == "directory-manifest":
        manifest.unlink()
        manifest.mkdir()
    elif damage == "garbage-manifest":
        manifest.write_bytes(b"\x00" * 10)
    else:
        os.symlink("/proc/self/nonexistent", bad / "data" / "x")
        manifest.write_bytes(b"{")
    (root / "latest").write_text('{"name": "../../../etc", "step": 99}')  # a hostile marker too
    code, out, err = helpers.run_cli("ls", str(root))
    assert code == 0 and "step-00000003" in out and "damaged" in out, (out, err)
    code, out, err = helpers.run_cli("gc", str(root), "--keep-last", "1", "--yes")
    assert code == 0, err
    assert bad.exists() and (root / "step-00000002").exists()  # newest loadable kept; damaged never deleted
    manager = ckpt.Manager(str(root), handle_sigterm=False)
    try:
        target = {"w": torch.zeros(4)}
        assert manager.restore(target) == 3
        assert torch.equal(target["w"], torch.full((4,), 2.0))
    finally:
        manager.close()
