"""kill -9 of a rank at a random point of a save, TRIALS times.

A 2-rank job commits version 1 to A and B, then saves version 2 over B (overwrite) and to a new
location C, while the test SIGKILLs one rank (the committer or the other, alternately) after a
random delay drawn over the length of those two saves: during data writes, index writes, the
manifest write, the commit record, clean-up, or after. Whatever the moment:

- a save any surviving rank reported as done loads bit for bit as version 2 (nothing reported
  saved is lost), and a surviving rank fails only with a CheckpointError, within the commit
  timeout plus slack, never hangs;
- B and C hold either version 1 / nothing or all of version 2, never a mix (nothing
  half-written loads); A, an earlier checkpoint, always loads bit for bit;
- ``ckpt gc --min-age 0 --yes`` then removes every leftover and changes none of that.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from dist import run_ranks_outcomes
from helpers import assert_bitwise, random_tensor, run_cli

import ckpt

pytestmark = [pytest.mark.faults, pytest.mark.dist, pytest.mark.slow]

WORLD = 2
TRIALS = 20
ROWS = 512  # x 1024 fp32 = 2 MiB per rank
COMMIT_TIMEOUT_S = 3.0


def _full(version: int) -> torch.Tensor:
    return random_tensor((WORLD * ROWS, 1024), torch.float32, seed=version)


def _state(version: int, rank: int) -> dict:
    part = _full(version)[rank * ROWS : (rank + 1) * ROWS].clone()
    return {"w": ckpt.Sharded.box(part, (WORLD * ROWS, 1024), (rank * ROWS, 0)), "step": version}


def kill_job(rank: int, world: int, root: str) -> dict:
    options = ckpt.SaveOptions(commit_timeout_s=COMMIT_TIMEOUT_S, chunk_bytes=1 << 20)
    ckpt.save(_state(1, rank), f"{root}/A", step=1, options=options)
    t0 = time.monotonic()
    ckpt.save(_state(1, rank), f"{root}/B", step=1, options=options)  # the plan is cached: as fast as v2's
    Path(root, f"pid-{rank}.tmp").write_text(str(os.getpid()))
    os.replace(Path(root, f"pid-{rank}.tmp"), Path(root, f"pid-{rank}"))  # whole, never half-written
    if rank == 0:  # how long one save takes here: the killer draws its delay from that
        while not all(Path(root, f"pid-{r}").exists() for r in range(world)):  # the killer reads the victim's
            time.sleep(0.001)
        Path(root, "go.tmp").write_text(str(time.monotonic() - t0))
        os.replace(Path(root, "go.tmp"), Path(root, "go"))
    else:
        while not Path(root, "go").exists():
            time.sleep(0.001)
    results = {}
    for name, overwrite in (("B", True), ("C", False)):
        t1 = time.monotonic()
        try:
            ckpt.save(_state(2, rank), f"{root}/{name}", step=2, options=ckpt.SaveOptions(
                commit_timeout_s=COMMIT_TIMEOUT_S, chunk_bytes=1 << 20, overwrite=overwrite))
            results[name] = {"ok": True, "elapsed": time.monotonic() - t1}
        except ckpt.CheckpointError as e:
            results[name] = {"ok": False, "error": type(e).__name__, "elapsed": time.monotonic() - t1}
    return results


def _holds(uri: str) -> int | None:
    """The version ``uri`` loads as (bitwise), or None when it holds no checkpoint."""
    got = {"w": torch.zeros(WORLD * ROWS, 1024), "step": -1}
    try:
        ckpt.load(got, uri)
    except ckpt.CheckpointNotFoundError:
        return None
    version = got["step"]
    assert_bitwise(got["w"], _full(version), f"{uri} as version {version}")
    return version


def _check(root: Path, reported: dict[str, bool], report: str) -> dict[str, int | None]:
    """What A, B and C load as; a save some rank reported done must hold version 2."""
    held = {name: _holds(str(root / name)) for name in "ABC"}
    assert held["A"] == 1, report
    assert held["B"] in (1, 2) and held["C"] in (None, 2), (held, report)
    for name in "BC":
        if reported[name]:
            assert held[name] == 2, (name, held, report)
    return held


class _Killer(threading.Thread):
    def __init__(self, root: Path, victim: int, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.root, self.victim, self.rng = root, victim, rng
        self.delay: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not (self.root / "go").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)
        one_save = float((self.root / "go").read_text())
        self.delay = self.rng.uniform(0, 2.2 * one_save)  # over both saves, sometimes just after
        time.sleep(self.delay)
        try:
            os.kill(int((self.root / f"pid-{self.victim}").read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_kill_9_of_a_rank_at_random_points_of_a_save(tmp_path):
    rng = random.Random(11)
    table = []
    for trial in range(TRIALS):
        root = tmp_path / f"t{trial}"
        root.mkdir()
        victim = trial % WORLD
        killer = _Killer(root, victim, rng)
        killer.start()
        outcomes = run_ranks_outcomes(kill_job, WORLD, str(root), timeout=120, start_method="forkserver")
        killer.join(10)
        report = f"trial {trial} victim {victim} delay {killer.delay}: " + "; ".join(
            f"rank {o.rank} {o.status} {o.value}" for o in outcomes
        )
        survivors = [o for o in outcomes if o.rank != victim]
        assert all(o.status == "ok" for o in survivors), report  # no hang, no stray exception
        assert outcomes[victim].status in ("died", "ok"), report
        reported = {name: any(o.value[name]["ok"] for o in outcomes if o.status == "ok") for name in "BC"}
        for o in survivors:
            for name in "BC":
                assert o.value[name]["elapsed"] < COMMIT_TIMEOUT_S + 20, report
                if not o.value[name]["ok"]:
                    assert o.value[name]["error"] in ("SaveAbortedError", "CheckpointExistsError"), report

        before = _check(root, reported, report)
        code, out, err = run_cli("gc", str(root), "--min-age", "0", "--yes", "--json")
        assert code == 0, err
        after = _check(root, reported, report)
        assert after["A"] == before["A"] and after["B"] == before["B"], (before, after)
        for name in "AB":  # no leftover inside a kept checkpoint
            assert sorted(os.listdir(root / name)) == ["data", "manifest.json"], (name, os.listdir(root / name))
        table.append((killer.delay is not None and outcomes[victim].status == "died", before["B"], before["C"]))
    killed = sum(1 for k, _, _ in table if k)
    print(f"\nkill -9 trials: {TRIALS}, killed mid-run: {killed}, "
          f"B replaced: {sum(1 for _, b, _ in table if b == 2)}, C committed: {sum(1 for _, _, c in table if c == 2)}")
    assert killed >= TRIALS // 2, table  # most kills land while the saves run
    print(json.dumps(table))
