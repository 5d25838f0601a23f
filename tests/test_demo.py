"""The README's first command (`python -m ckpt.demo`), at a small size."""

import os

import pytest
import torch

import ckpt
from ckpt.demo import DemoConfig, build_state, check_state, main, run_demo

SMALL = ["--layers", "1", "--dim", "16", "--vocab", "50"]


def test_demo_saves_reshards_and_verifies_bitwise(tmp_path, capsys):
    """Exit status 0 means every loaded tensor and value matched bitwise; the kept
    checkpoint loads again here, and the report says what was verified."""
    assert main([*SMALL, "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "verified: every loaded tensor and value is bitwise equal" in out
    assert out.count("bitwise equal") == 3  # two load phases + the verdict
    uri = os.path.join(tmp_path, "step-000100")
    cfg = DemoConfig(layers=1, dim=16, hidden=64, vocab=50)
    sd, leaves = build_state(cfg, None, None, fill=False)
    manifest = ckpt.load(sd, uri)
    assert manifest.step == 100 and manifest.topology["world_size"] == 2
    assert check_state(cfg, sd, leaves) == []


def test_demo_result_reports_each_rank(tmp_path):
    cfg = DemoConfig(layers=1, dim=16, hidden=64, vocab=50, save_world=2, load_world=3)
    res = run_demo(cfg, str(tmp_path))
    assert res.verified
    assert [(p.what, p.world) for p in res.phases] == [("save", 2), ("load", 3), ("load", 1)]
    reshard, single = res.phases[1], res.phases[2]
    assert [r["rank"] for r in reshard.ranks] == [0, 1, 2]
    for r in reshard.ranks:
        assert r["problems"] == [] and r["save_id"] == res.manifest.save_id
    # The single process needs every tensor: it reads every chunk, nothing more.
    assert single.ranks[0]["read_bytes"] == res.tensor_bytes
    # A resharding rank reads at least what it holds and at most every stored byte.
    for r in reshard.ranks:
        assert r["local_bytes"] <= r["read_bytes"] <= res.tensor_bytes and r["requests"] >= 1
    # A second run into the same directory refuses to replace the checkpoint unless asked.
    with pytest.raises(Exception, match="committed checkpoint exists"):
        run_demo(cfg, str(tmp_path))


def test_check_state_names_the_tensor_that_differs():
    """The demo's verdict can fail: one flipped element is reported by key."""
    cfg = DemoConfig(layers=1, dim=16, hidden=64, vocab=50)
    sd, leaves = build_state(cfg, None, None, fill=True)
    assert check_state(cfg, sd, leaves) == []
    w = sd["model"]["layers.0.mlp.down.weight"]
    w.view(-1)[7] = torch.nextafter(w.view(-1)[7], torch.tensor(1.0))
    sd["train"]["step"] = 99
    problems = check_state(cfg, sd, leaves)
    assert len(problems) == 2
    assert problems[0].startswith("model.layers.0.mlp.down.weight: bytes differ")
    assert problems[1].startswith("train: JSON value")
