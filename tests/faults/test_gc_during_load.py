"""gc during load: ``ckpt gc --yes`` (another process) deletes checkpoints while this process loads them.

Every load either gives back bitwise the state that checkpoint saved, or fails with a CheckpointError
subclass (the manifest gone: CheckpointNotFoundError; an object gone mid-load: MissingObjectError naming
it and the byte range), never a bare FileNotFoundError or mixed data; the checkpoint gc keeps still
loads bitwise afterwards.
"""

from __future__ import annotations

import collections
import os
import random
import subprocess
import sys
import threading
import traceback

import pytest
import torch
from helpers import assert_bitwise, random_tensor

import ckpt
from ckpt.options import LoadOptions, SaveOptions

pytestmark = pytest.mark.faults

TRIALS = 20


def state(step: int) -> dict:
    return {"w": random_tensor((128, 1024), torch.float32, step), "b": random_tensor((4096,), torch.int64, step)}


def _zeros() -> dict:
    return {"w": torch.zeros(128, 1024), "b": torch.zeros(4096, dtype=torch.int64)}


def _loader(step: int, root, opts: LoadOptions, stop: threading.Event, errors: list, outcomes: collections.Counter):
    """Load checkpoint ``step`` until gc is done with it, counting each outcome; any error that is not
    a CheckpointError lands in ``errors``."""
    uri = str(root / f"step-{step:08d}")
    while not stop.is_set():
        target = _zeros()
        try:
            ckpt.load(target, uri, options=opts)
        except ckpt.CheckpointError as e:
            outcomes[type(e).__name__] += 1
            if isinstance(e, ckpt.CheckpointNotFoundError):
                return  # the manifest is gone: nothing more to race with
            continue
        except BaseException as e:  # anything else is the bug this test is for
            errors.append(e)
            return
        want = state(step)
        for k in want:
            assert_bitwise(target[k], want[k], k)
        outcomes["loaded bitwise"] += 1


def test_gc_deleting_checkpoints_under_a_loader(tmp_path):
    outcomes: collections.Counter[str] = collections.Counter()
    rng = random.Random(11)
    # Small chunks read one request at a time: a load opens the object again and again, so the
    # deletion lands in the middle of loads, not only between them.
    opts = LoadOptions(io_threads=1, max_read_bytes=64 << 10, max_gap_bytes=0)
    for trial in range(TRIALS):
        root = tmp_path / f"run{trial}"
        for step in (1, 2, 3):
            ckpt.save(state(step), str(root / f"step-{step:08d}"), step=step, options=SaveOptions(chunk_bytes=32 << 10))
        stop = threading.Event()
        errors: list[BaseException] = []

        args = (root, opts, stop, errors, outcomes)
        threads = [threading.Thread(target=_loader, args=(s, *args)) for s in (1, 2, 1)]
        for t in threads:
            t.start()
        threading.Event().wait(rng.uniform(0.0, 0.3))
        gc = subprocess.run(
            [sys.executable, "-m", "ckpt.cli", "gc", str(root), "--keep-last", "1", "--yes"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert gc.returncode == 0, gc.stderr
        assert not errors, f"trial {trial}: " + "".join(traceback.format_exception(errors[0]))
        assert sorted(os.listdir(root)) == ["step-00000003"], os.listdir(root)
        target = _zeros()
        ckpt.load(target, str(root / "step-00000003"))
        for k, v in state(3).items():
            assert_bitwise(target[k], v, k)
    print(f"gc during load, {TRIALS} trials: {dict(outcomes)}")
    assert outcomes["CheckpointNotFoundError"] >= TRIALS  # every trial saw its deletion land
