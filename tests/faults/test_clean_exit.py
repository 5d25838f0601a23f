"""Processes that end while ckpt's background work runs exit cleanly and keep their saves.

A script may end (normally or by an exception) right after ``async_save`` returned, while a
lazy snapshot is still copying, or while ``Manager`` marks ``latest`` and applies retention.
Before, those ran in daemon threads that the interpreter abandoned mid-call into torch
("terminate called without an active exception", SIGABRT) and the save was lost. Now each
is finished before interpreter shutdown. Each scenario runs TRIALS times in fresh processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import ckpt

pytestmark = pytest.mark.faults

TRIALS = 20
PARALLEL = 4  # processes at a time: most of each is interpreter and torch start-up

MID_RETENTION = """
import sys, torch, ckpt
m = ckpt.Manager(sys.argv[1], every_steps=1, retention=ckpt.RetentionPolicy(keep_last=1))
state = {"w": torch.full((256, 256), 0.0)}
for step in range(1, 6):
    state["w"].fill_(step)
    m.maybe_save(step, state)
if sys.argv[2] == "raise":
    raise SystemExit("ending with saves, the marker and retention still in flight")
"""

MID_LAZY_SNAPSHOT = """
import sys, torch, ckpt
state = {"w": torch.arange(4 << 20, dtype=torch.float32), "lr": [0.1, 0.2]}
ckpt.async_save(state, sys.argv[1], lazy=True)
state["lr"].append(9.0)  # after return: must not reach the checkpoint
if sys.argv[2] == "raise":
    raise RuntimeError("ending while the lazy snapshot copies")
"""


def _run(script: str, uri: str, how: str) -> subprocess.CompletedProcess:
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), uri, how],
        capture_output=True, text=True, timeout=300, env=env,
    )


def _trials(script: str, tmp_path) -> list[tuple[str, str, subprocess.CompletedProcess]]:
    cases = [(str(tmp_path / f"t{i}" / "c"), "raise" if i % 2 else "return") for i in range(TRIALS)]
    with ThreadPoolExecutor(PARALLEL) as pool:
        done = list(pool.map(lambda c: _run(script, *c), cases))
    return [(uri, how, p) for (uri, how), p in zip(cases, done)]


def _assert_clean(how: str, p: subprocess.CompletedProcess) -> None:
    assert "terminate called" not in p.stderr and p.returncode >= 0, p.stderr[-2000:]
    assert p.returncode == (1 if how == "raise" else 0), p.stderr[-2000:]


def test_exit_mid_retention_keeps_the_newest_save_and_finishes_retention(tmp_path):
    for root, how, p in _trials(MID_RETENTION, tmp_path):
        _assert_clean(how, p)
        names = sorted(os.listdir(root))
        assert names == ["latest", "step-00000005"], (names, p.stderr[-2000:])
        state = {"w": torch.zeros(256, 256)}
        ckpt.load(state, f"{root}/step-00000005")
        assert torch.equal(state["w"], torch.full((256, 256), 5.0))


def test_exit_mid_lazy_snapshot_commits_what_was_passed(tmp_path):
    for uri, how, p in _trials(MID_LAZY_SNAPSHOT, tmp_path):
        _assert_clean(how, p)
        state = {"w": torch.zeros(4 << 20), "lr": [0.0, 0.0]}
        ckpt.load(state, uri)
        assert torch.equal(state["w"], torch.arange(4 << 20, dtype=torch.float32))
        assert state["lr"] == [0.1, 0.2]
