"""Lightning with ckpt's CheckpointIO: a real Trainer fits, is SIGKILLed, resumes from the
checkpoint ckpt wrote, and continues with exactly the losses of an uninterrupted run; the
usual checkpoint contents (hyper-parameters, callback state, loops, schedulers) round-trip."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

import ckpt  # noqa: E402

pytestmark = pytest.mark.faults

JOB = os.path.join(os.path.dirname(__file__), "lightning_job.py")


def _job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, JOB, *args], capture_output=True, text=True, timeout=600, env=env)


def test_fit_kill_resume_continues_with_identical_losses(tmp_path):
    whole = _job(str(tmp_path / "whole"), "--losses", str(tmp_path / "whole.json"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = json.loads((tmp_path / "whole.json").read_text())
    assert len(reference) == 9  # 3 epochs x 3 batches

    killed = _job(str(tmp_path / "run"), "--kill-at-epoch", "2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = sorted(os.listdir(tmp_path / "run"))
    assert saved == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt"], saved

    resumed = _job(
        str(tmp_path / "run"), "--resume", str(tmp_path / "run" / "epoch=1-step=6.ckpt"),
        "--losses", str(tmp_path / "resumed.json"),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "resumed.json").read_text()) == reference[6:]


def test_lightning_checkpoint_contents_round_trip(tmp_path):
    done = _job(str(tmp_path / "run"), "--epochs", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    got = ckpt.read(str(tmp_path / "run" / "epoch=0-step=3.ckpt"))
    assert got["epoch"] == 0 and got["global_step"] == 3
    assert got["hyper_parameters"]["run"] == argparse.Namespace(name="job", tags=("a", "b"))
    assert got["hyper_parameters"]["lr"] == 0.05
    assert set(got["state_dict"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert got["optimizer_states"][0]["param_groups"][0]["lr"] == 0.05
    assert got["lr_schedulers"][0]["step_size"] == 2
    assert "fit_loop" in got["loops"]
    (callback_key,) = [k for k in got["callbacks"] if k.startswith("ModelCheckpoint")]
    assert got["callbacks"][callback_key]["dirpath"] == str(tmp_path / "run")
