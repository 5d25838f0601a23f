"""kill -9 during incremental saves (which reference older checkpoints' chunks, while retention runs) and
during gc: every checkpoint that remains committed still loads bitwise, and a later gc finishes the job.

The state of step ``s`` is a pure function of ``s``: a frozen base that changes every third step
(so references move from checkpoint to checkpoint and older ones retire, then free) and an adapter.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import ckpt
from ckpt.catalog import EntryStatus, collect, plan_gc, scan
from ckpt.options import RetentionPolicy

pytestmark = pytest.mark.faults

STATE = """
import torch

def state(step):
    base = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)) + step // 3
    return {"base": base, "adapter": torch.full((64, 1024), float(step)), "step": step}
"""

SAVER = STATE + """
import sys, ckpt
root = sys.argv[1]
m = ckpt.Manager(root, incremental=True, retention=ckpt.RetentionPolicy(keep_last=2), handle_sigterm=False)
step = (m.all_steps() or [0])[-1]
print("ready", flush=True)
while True:
    step += 1
    m.save(step, state(step))
    m.wait()
"""

COLLECTOR = """
import sys
from ckpt.catalog import collect, plan_gc, scan
from ckpt.options import RetentionPolicy
doomed = plan_gc(scan(sys.argv[1]), RetentionPolicy(keep_last=1))
print("start", flush=True)
collect(sys.argv[1], doomed)
print("done", flush=True)
"""

namespace: dict = {}
exec(STATE, namespace)
state = namespace["state"]


def _spawn(script: str, root: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), root], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )


def _kill_after(p: subprocess.Popen, line: str, delay: float) -> None:
    got = p.stdout.readline().strip()
    assert got == line, (got, p.stderr.read()[-2000:] if p.poll() is not None else "")
    time.sleep(delay)
    p.kill()
    p.wait(timeout=60)


def _assert_all_load(root: str) -> int:
    """Load every committed checkpoint under ``root`` and compare bitwise; return how many."""
    n = 0
    for e in scan(root):
        if e.status is not EntryStatus.COMPLETE:
            continue
        want = state(e.step)
        out = {"base": torch.zeros(1024, 1024), "adapter": torch.zeros(64, 1024), "step": None}
        ckpt.load(out, e.uri)
        assert torch.equal(out["base"], want["base"]) and torch.equal(out["adapter"], want["adapter"]), e.uri
        assert out["step"] == e.step
        n += 1
    return n


def test_kill_during_incremental_saves_and_their_retention(tmp_path):
    root = str(tmp_path / "run")
    rng = random.Random(16)
    loaded = 0
    for _ in range(6):
        p = _spawn(SAVER, root)
        _kill_after(p, "ready", rng.uniform(0.3, 2.5))
        loaded += _assert_all_load(root)
        # a gc after the crash frees what nothing references and keeps the rest loadable
        collect(root, plan_gc(scan(root), RetentionPolicy(keep_last=2)))
        _assert_all_load(root)
    statuses = {e.status for e in scan(root)}
    assert loaded > 0 and EntryStatus.COMPLETE in statuses
    refs = [e for e in scan(root) if e.status is EntryStatus.COMPLETE and e.shared]
    assert refs, "no checkpoint referenced an older one: the test did not exercise references"


def test_kill_during_gc(tmp_path):
    rng = random.Random(61)
    for trial in range(4):
        root = str(tmp_path / f"run{trial}")
        m = ckpt.Manager(root, incremental=True, handle_sigterm=False)
        for step in range(1, 11):
            m.save(step, state(step))
            m.wait()
        m.close()
        p = _spawn(COLLECTOR, root)
        _kill_after(p, "start", rng.uniform(0.0, 0.2))
        assert _assert_all_load(root) >= 1
        collect(root, plan_gc(scan(root), RetentionPolicy(keep_last=1)))
        assert _assert_all_load(root) == 1
        left = {e.name: e.status for e in scan(root)}
        # step 10 references the base of steps 9..10, held by step 9: only that one stays, retired
        assert left == {"step-00000009": EntryStatus.RETIRED, "step-00000010": EntryStatus.COMPLETE}, left
