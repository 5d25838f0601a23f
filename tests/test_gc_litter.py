"""``ckpt gc`` finds and removes leftovers inside complete checkpoints, and nothing a checkpoint or a
save in flight needs: partial data of a failed overwrite, objects a commit could not delete, staging
files of aborted and crashed saves. Dry run by default."""

from __future__ import annotations

import json
import os
import time

import torch
from helpers import assert_bitwise, random_tensor, run_cli

import ckpt
from ckpt.commit import ABORT
from ckpt.storage import open_storage

HOUR = 3600.0


def _state(seed: int) -> dict:
    return {"w": random_tensor((128, 16), torch.float32, seed)}


def _assert_holds(uri: str, seed: int) -> None:
    got = {"w": torch.zeros(128, 16)}
    ckpt.load(got, uri)
    assert_bitwise(got["w"], _state(seed)["w"], "w")


def _age(path: str, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _leftovers(ckpt_dir: str) -> dict[str, str]:
    """A failed overwrite's partial object, an object of a replaced save whose deletion failed,
    an aborted save's files, a crashed save's staging, and files of a save still in flight."""
    files = {
        "data/dead0001-000003-r00001.safetensors": "old",  # partial: its rank was killed
        "data/dead0001-000001-r00000.safetensors": "old",  # a replaced save's, deletion failed
        "data/abrt0001-000002-r00000.safetensors": "young",  # aborted a moment ago
        f"_staging/abrt0001-000002/{ABORT}": "young",
        "_staging/abrt0001-000002/rank-00001.error": "young",
        "_staging/dead0001-000003/rank-00000.json": "old",  # crashed before the commit
        "data/live0001-000009-r00000.safetensors": "young",  # a save in flight: data first ...
        "_staging/live0001-000009/rank-00000.json": "young",  # ... then its index
    }
    for rel, age in files.items():
        path = os.path.join(ckpt_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"\0" * 1000 if rel.startswith("data/") else b"{}")
        if age == "old":
            _age(path, 2 * HOUR)
    return files


def test_gc_removes_leftovers_inside_kept_checkpoints_and_spares_saves_in_flight(tmp_path):
    root = str(tmp_path / "run")
    ckpt.save(_state(1), f"{root}/step-00000001", step=1)
    ckpt.save(_state(2), f"{root}/step-00000002", step=2)
    files = _leftovers(f"{root}/step-00000002")
    removable = sorted(f"step-00000002/{rel}" for rel in files if "live" not in rel)

    code, out, _ = run_cli("gc", root, "--json")
    report = json.loads(out)
    assert code == 0 and report["dry_run"]
    assert sorted(x["path"] for x in report["would_remove_litter"]) == removable
    why = {x["path"]: x["why"] for x in report["would_remove_litter"]}
    assert why["step-00000002/data/abrt0001-000002-r00000.safetensors"] == "data of an aborted save"
    assert "in no manifest" in why["step-00000002/data/dead0001-000003-r00001.safetensors"]
    assert all(os.path.exists(f"{root}/step-00000002/{rel}") for rel in files)  # a dry run deletes nothing

    code, out, _ = run_cli("gc", root)
    assert "would remove  step-00000002/data/dead0001-000003-r00001.safetensors  (1000 B" in out, out
    assert "dry run" in out

    code, out, _ = run_cli("gc", root, "--yes")
    assert code == 0 and "removed 6 leftover file(s)" in out, out
    left = sorted(
        os.path.relpath(os.path.join(d, f), f"{root}/step-00000002")
        for d, _, fs in os.walk(f"{root}/step-00000002")
        for f in fs
    )
    data = sorted(ckpt.load({"w": torch.zeros(128, 16)}, f"{root}/step-00000002").objects)
    assert left == sorted([*data, "manifest.json", *(r for r in files if "live" in r)])
    assert not os.path.exists(f"{root}/step-00000002/_staging/abrt0001-000002")  # emptied dirs go too
    _assert_holds(f"{root}/step-00000001", 1)
    _assert_holds(f"{root}/step-00000002", 2)

    # With --min-age 0 the in-flight save's files count as well (for a root known to be idle).
    code, out, _ = run_cli("gc", root, "--min-age", "0", "--yes")
    assert "removed 2 leftover file(s)" in out, out
    _assert_holds(f"{root}/step-00000002", 2)


def test_gc_on_an_overwritten_location_removes_objects_a_failed_clean_up_left(tmp_path, monkeypatch):
    uri = str(tmp_path / "c")
    ckpt.save(_state(1), uri, step=1)
    old = open_storage(uri).listdir("data")
    storage_cls = type(open_storage(uri))
    real = storage_cls.delete
    monkeypatch.setattr(storage_cls, "delete", lambda self, rel, recursive=False: None)  # every delete "fails"
    ckpt.save(_state(2), uri, step=2, options=ckpt.SaveOptions(overwrite=True))
    monkeypatch.setattr(storage_cls, "delete", real)
    assert set(old) < set(open_storage(uri).listdir("data"))
    assert json.loads(run_cli("gc", uri, "--json")[1])["would_remove_litter"] == []  # too young to be sure
    code, out, _ = run_cli("gc", uri, "--min-age", "0", "--yes", "--json")
    removed = json.loads(out)["removed_litter"]
    assert sorted(x["path"] for x in removed if x["path"].startswith("data/")) == [f"data/{o}" for o in old]
    assert sorted(open_storage(uri).listdir("")) == ["data", "manifest.json"]
    _assert_holds(uri, 2)
