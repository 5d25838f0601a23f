"""Incremental saves: chunks identical to an earlier checkpoint of the run root are referenced, not
written; every checkpoint loads on its own, bitwise; retention, gc and overwrites keep referenced
objects (also while a save that references them is in flight) and free them once unreferenced."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckpt
from ckpt import refs
from ckpt.catalog import EntryStatus, collect, plan_gc, scan
from ckpt.options import Compression, RetentionPolicy, SaveOptions
from ckpt.reader import CheckpointReader
from ckpt.storage.local import LocalStorage
from tests.helpers import edit_manifest, run_cli

BASE = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))  # 2 MiB, frozen


def _state(step: int) -> dict:
    return {"base": BASE, "adapter": torch.full((8, 1024), float(step)), "step": step}


def _own_bytes(uri: str) -> int:
    return sum(CheckpointReader(uri).manifest.objects.values())


def _load(uri: str) -> dict:
    out = {"base": torch.zeros_like(BASE), "adapter": torch.zeros(8, 1024), "step": None}
    ckpt.load(out, uri)
    return out


def _assert_step(uri: str, step: int) -> None:
    out = _load(uri)
    assert torch.equal(out["base"], BASE) and torch.equal(out["adapter"], _state(step)["adapter"]), uri
    assert out["step"] == step


def test_later_saves_write_only_what_changed_and_load_alone(tmp_path):
    root = str(tmp_path)
    m = ckpt.Manager(root, incremental=True)
    for step in (1, 2, 3):
        m.save(step, _state(step))
        m.wait()
    m.close()
    first, third = f"{root}/step-00000001", f"{root}/step-00000003"
    assert _own_bytes(first) > BASE.nbytes
    assert _own_bytes(third) < 2 * _state(3)["adapter"].nbytes  # the adapter and a header
    manifest = CheckpointReader(third).manifest
    (chunk,) = manifest.tensors["base"].chunks
    assert chunk.object.startswith("../step-00000001/data/") and chunk.digest.startswith("blake3:")
    assert set(manifest.refs) == {"step-00000001"}  # not through step 2: never a chain
    for step in (1, 2, 3):
        _assert_step(f"{root}/step-{step:08d}", step)
    code, out, _ = run_cli("verify", third, "--json")
    report = json.loads(out)
    assert code == 0 and report["shared_chunks"] == 1 and report["shared_stored_bytes"] == BASE.nbytes
    code, out, _ = run_cli("ls", root, "--json")
    listed = {e["name"]: e for e in json.loads(out)}
    assert listed["step-00000003"]["shared"] >= BASE.nbytes and listed["step-00000001"]["shared"] == 0


def test_compressed_chunks_are_referenced_with_their_frames(tmp_path):
    opts = SaveOptions(compression=Compression(), incremental=True)
    state = {"w": (BASE * 0.02).to(torch.bfloat16), "a": torch.zeros(4, 4)}
    ckpt.save(state, str(tmp_path / "a"), options=opts)
    state["a"] += 1
    ckpt.save(state, str(tmp_path / "b"), options=SaveOptions(compression=Compression(),
                                                              incremental_from=str(tmp_path / "a")))
    (w,) = CheckpointReader(str(tmp_path / "b")).manifest.tensors["w"].chunks
    assert w.object.startswith("../a/") and w.codec is not None
    out = {"w": torch.zeros_like(state["w"]), "a": torch.zeros(4, 4)}
    ckpt.load(out, str(tmp_path / "b"))
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["a"], state["a"])


def test_a_base_without_digests_or_outside_the_root_is_not_referenced(tmp_path):
    ckpt.save(_state(1), str(tmp_path / "plain"))  # no digests recorded
    ckpt.save(_state(2), str(tmp_path / "next"), options=SaveOptions(incremental_from=str(tmp_path / "plain")))
    assert not CheckpointReader(str(tmp_path / "next")).manifest.refs
    _assert_step(str(tmp_path / "next"), 2)
    with pytest.raises(ValueError, match="under the run root"):
        ckpt.save(_state(3), str(tmp_path / "x" / "c"), options=SaveOptions(incremental_from=str(tmp_path / "next")))


def test_retention_retires_referenced_checkpoints_and_frees_them_later(tmp_path):
    root = str(tmp_path)
    m = ckpt.Manager(root, incremental=True, retention=RetentionPolicy(keep_last=1))
    for step in (1, 2, 3):
        m.save(step, _state(step))
        m.wait()
    status = {e.name: e.status for e in scan(root)}
    assert status == {"step-00000001": EntryStatus.RETIRED, "step-00000003": EntryStatus.COMPLETE}
    assert not os.path.exists(f"{root}/step-00000001/manifest.json")
    _assert_step(f"{root}/step-00000003", 3)
    global BASE
    old, BASE = BASE, BASE + 1  # the base changes: nothing references step 1 any more
    try:
        m.save(4, _state(4))
        m.wait()
        m.close()
        assert {e.name for e in scan(root)} == {"step-00000004"}
        _assert_step(f"{root}/step-00000004", 4)
    finally:
        BASE = old


def test_gc_keeps_objects_an_in_flight_save_declared(tmp_path):
    root = str(tmp_path)
    opts = SaveOptions(incremental=True)
    ckpt.save(_state(1), f"{root}/step-00000001", step=1, options=opts)
    ckpt.save(_state(2), f"{root}/step-00000002", step=2, options=opts)
    obj = next(iter(CheckpointReader(f"{root}/step-00000001").manifest.objects))
    declared = tmp_path / "step-00000003" / "_staging" / "s1" / "refs-r00000.json"
    declared.parent.mkdir(parents=True)
    declared.write_text(json.dumps({"refs": {"step-00000001": [obj]}}))
    doomed = [e for e in scan(root) if e.name == "step-00000001"]
    assert [e.name for e in collect(root, doomed)] == ["step-00000001"]
    assert os.path.exists(f"{root}/step-00000001/{obj}") and not os.path.exists(f"{root}/step-00000001/manifest.json")
    declared.unlink()
    collect(root, [])
    assert not os.path.exists(f"{root}/step-00000001")
    _assert_step(f"{root}/step-00000002", 2)


def test_a_save_whose_base_goes_away_writes_every_chunk(tmp_path, monkeypatch):
    root = str(tmp_path)
    ckpt.save(_state(1), f"{root}/a", options=SaveOptions(incremental=True))
    put = LocalStorage.put_atomic

    def declare_then_lose_base(self, rel, data):
        put(self, rel, data)
        if "refs-r" in rel:  # gc deletes the base right after the declaration
            os.unlink(f"{root}/a/manifest.json")

    monkeypatch.setattr(LocalStorage, "put_atomic", declare_then_lose_base)
    ckpt.save(_state(2), f"{root}/b", options=SaveOptions(incremental_from=f"{root}/a"))
    manifest = CheckpointReader(f"{root}/b").manifest
    assert not manifest.refs and _own_bytes(f"{root}/b") > BASE.nbytes
    _assert_step(f"{root}/b", 2)


def test_overwriting_a_referenced_checkpoint_keeps_what_others_reference(tmp_path):
    root = str(tmp_path)
    ckpt.save(_state(1), f"{root}/a", options=SaveOptions(incremental=True))
    ckpt.save(_state(2), f"{root}/b", options=SaveOptions(incremental_from=f"{root}/a"))
    other = {"base": torch.zeros_like(BASE), "adapter": torch.zeros(8, 1024), "step": 0}
    ckpt.save(other, f"{root}/a", options=SaveOptions(overwrite=True))
    _assert_step(f"{root}/b", 2)
    assert torch.equal(_load(f"{root}/a")["base"], other["base"])


def test_plan_gc_never_dooms_retired_checkpoints_again(tmp_path):
    root = str(tmp_path)
    m = ckpt.Manager(root, incremental=True, retention=RetentionPolicy(keep_last=1))
    for step in (1, 2):
        m.save(step, _state(step))
        m.wait()
    m.close()
    entries = scan(root)
    assert [e.status for e in entries] == [EntryStatus.RETIRED, EntryStatus.COMPLETE]
    assert plan_gc(entries, RetentionPolicy(keep_last=1)) == []
    assert refs.live_objects(LocalStorage(root)) == {
        f"step-00000001/{o}" for o in CheckpointReader(f"{root}/step-00000002").manifest.refs["step-00000001"]
    }


def test_every_tool_reads_a_compressed_incremental_checkpoint_and_a_version_1_one(tmp_path):
    from ckpt.format import MANIFEST

    root = str(tmp_path / "run")
    opts = SaveOptions(compression=Compression(), incremental=True)
    state = {"w": (BASE * 0.02).to(torch.bfloat16), "a": torch.arange(12.0).reshape(3, 4), "lr": 0.5}
    ckpt.save(state, f"{root}/s1", step=1, options=opts)
    state["a"] = state["a"] + 1
    ckpt.save(state, f"{root}/s2", step=2, options=SaveOptions(compression=Compression(),
                                                               incremental_from=f"{root}/s1"))
    # a version 1 checkpoint: what this library wrote before version 2 (no structure, no digest)
    v1 = str(tmp_path / "v1")
    ckpt.save({"w": state["w"], "a": state["a"], "lr": 0.5}, v1)
    edit_manifest(v1, lambda doc: [doc.update(version=1), doc.pop("structure"), doc.pop("digest")], reseal=False)
    assert json.load(open(f"{v1}/{MANIFEST}"))["version"] == 1
    for c in (f"{root}/s2", v1):
        code, out, _ = run_cli("info", c, "--json")
        assert code == 0 and json.loads(out)["tensors"]["w"]["dtype"] == "bfloat16"
        assert run_cli("verify", c)[0] == 0
        code, out, _ = run_cli("diff", c, f"{root}/s2")
        assert code == 0, out
        assert run_cli("export", c, str(tmp_path / f"hf-{os.path.basename(c)}"), "--to", "safetensors")[0] == 0
        assert run_cli("reshard", c, str(tmp_path / f"r-{os.path.basename(c)}"), "--for-world", "2")[0] == 0
        out = {"w": torch.zeros_like(state["w"]), "a": torch.zeros(3, 4), "lr": None}
        ckpt.load(out, str(tmp_path / f"r-{os.path.basename(c)}"))
        assert torch.equal(out["w"], state["w"]) and torch.equal(out["a"], state["a"]) and out["lr"] == 0.5
    code, out, _ = run_cli("info", f"{root}/s2")
    assert "shared" in out and "compressed" in out
    code, _, _ = run_cli("merge", f"{root}/s2", v1, "-o", str(tmp_path / "m"), "--no-progress")
    assert code == 0
    merged = {"w": torch.zeros_like(state["w"]), "a": torch.zeros(3, 4), "lr": None}
    ckpt.load(merged, str(tmp_path / "m"))
    assert torch.equal(merged["a"], state["a"])


def test_gc_dry_run_says_which_checkpoints_it_would_retire(tmp_path):
    root = str(tmp_path)
    opts = SaveOptions(incremental=True)
    ckpt.save(_state(1), f"{root}/step-00000001", step=1, options=opts)
    ckpt.save(_state(2), f"{root}/step-00000002", step=2, options=SaveOptions(incremental_from=f"{root}/step-00000001"))
    ckpt.save(_state(3), f"{root}/step-00000003", step=3, options=SaveOptions(incremental_from=f"{root}/step-00000002"))
    code, out, _ = run_cli("gc", root, "--keep-last", "1", "--json")
    report = json.loads(out)
    assert code == 0 and report["would_retire"] == ["step-00000001"]
    assert sorted(e["name"] for e in report["would_delete"]) == ["step-00000001", "step-00000002"]
    code, out, _ = run_cli("gc", root, "--keep-last", "1", "--yes", "--json")
    assert json.loads(out)["retired"] == ["step-00000001"]
    assert {e.name: e.status for e in scan(root)} == {
        "step-00000001": EntryStatus.RETIRED, "step-00000003": EntryStatus.COMPLETE
    }
    _assert_step(f"{root}/step-00000003", 3)
