"""A disk that fills up mid-save: a size-limited tmpfs (mounted here when the test runs as root;
otherwise writes are capped by an injected ENOSPC, and the test says which it used).

Two ranks commit version 1, then overwrite it with a version that does not fit. Every rank fails
within seconds, not at the (default, 600 s) commit timeout: the rank that hit the full disk with
StorageFullError naming the object it was writing (its data object, or its staging index when the
data just fit), the other with SaveAbortedError naming that rank and cause.
Version 1 still loads bit for bit, the failed ranks removed their partial objects, ``ckpt gc``
leaves nothing behind, and once there is room again a save succeeds.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time

import pytest
import torch
from dist import run_ranks
from helpers import assert_bitwise, random_tensor, run_cli

import ckpt

pytestmark = [pytest.mark.faults, pytest.mark.dist]

WORLD = 2
MiB = 1 << 20
DISK_BYTES = 10 * MiB


def _full(version: int, rows: int) -> torch.Tensor:
    return random_tensor((WORLD * rows, 1024), torch.float32, seed=version)


def _state(version: int, rank: int, rows: int) -> dict:
    part = _full(version, rows)[rank * rows : (rank + 1) * rows].clone()
    return {"w": ckpt.Sharded.box(part, (WORLD * rows, 1024), (rank * rows, 0)), "step": version}


@pytest.fixture
def small_disk(tmp_path):
    """(directory, how): a DISK_BYTES tmpfs, or a directory whose writes an injected ENOSPC caps."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(where)], capture_output=True
    ).returncode == 0
    try:
        yield str(where), "tmpfs" if mounted else "injected"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=False)


def _cap_writes(directory: str, limit: int) -> None:
    """Without a tmpfs: data writes under ``directory`` fail with ENOSPC past ``limit`` bytes in all."""
    from ckpt.storage import local

    real = local.LocalStorage.open_write

    def used() -> int:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs)

    class Capped:
        def __init__(self, f):
            self.f = f

        def write(self, buf):
            if used() + len(buf) > limit:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return self.f.write(buf)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def open_write(self, rel):
        from contextlib import contextmanager

        @contextmanager
        def cm():
            with real(self, rel) as f:
                yield Capped(f)

        return cm()

    local.LocalStorage.open_write = open_write


def full_disk_job(rank: int, world: int, disk: str, how: str) -> dict:
    if how == "injected":
        _cap_writes(disk, DISK_BYTES)
    uri = f"{disk}/ckpt"
    ckpt.save(_state(1, rank, 256), uri, step=1)  # 2 MiB in all
    t0 = time.monotonic()
    try:  # 2 x 4 MiB more: does not fit beside version 1
        ckpt.save(_state(2, rank, 1024), uri, step=2, options=ckpt.SaveOptions(overwrite=True))
        result = {"error": None}
    except ckpt.CheckpointError as e:
        result = {
            "error": type(e).__name__,
            "message": str(e),
            "isoserror": isinstance(e, OSError),
            "failed_rank": getattr(e, "rank", None),
            "cause": getattr(e, "cause", None),
        }
    result["elapsed"] = time.monotonic() - t0
    return result


def test_disk_full_mid_overwrite_fails_every_rank_fast_and_keeps_the_old_checkpoint(small_disk):
    disk, how = small_disk
    print(f"\ndisk full by: {how}")
    results = run_ranks(full_disk_job, WORLD, disk, how, start_method="forkserver", timeout=180)
    full = [r for r, res in enumerate(results) if res["error"] == "StorageFullError"]
    assert full, results
    for rank, res in enumerate(results):
        assert res["elapsed"] < 20, (rank, res)  # not the 600 s commit timeout
        if rank in full:
            # the object it was writing: its data object, or (the data just fitting) its staging index
            assert res["isoserror"] and f"{disk}/ckpt/" in res["message"] and "no space left" in res["message"], res
        else:
            assert res["error"] == "SaveAbortedError", res
            assert res["failed_rank"] in full and res["cause"] == "StorageFullError", res
            assert f"rank {res['failed_rank']}: StorageFullError" in res["message"], res
    uri = f"{disk}/ckpt"
    got = {"w": torch.zeros(WORLD * 256, 1024), "step": -1}
    ckpt.load(got, uri)
    assert_bitwise(got["w"], _full(1, 256), "w")
    objects = set(ckpt.load(got, uri).objects)
    extra = {f"data/{n}" for n in os.listdir(f"{uri}/data")} - objects
    # A rank that hit the full disk removed its partial object; a rank that finished left a whole one.
    assert not any(n.endswith(f"-r{r:05d}.safetensors") for n in extra for r in full), (extra, full)
    code, out, err = run_cli("gc", uri, "--min-age", "0", "--yes")
    assert code == 0, err
    assert {f"data/{n}" for n in os.listdir(f"{uri}/data")} == objects  # only version 1's objects remain
    assert sorted(os.listdir(uri)) == ["data", "manifest.json"]
    # Room again: version 3 (as small as version 1) replaces version 1.
    run_ranks(_save_small, WORLD, disk, how, start_method="forkserver", timeout=120)
    ckpt.load(got, uri)
    assert_bitwise(got["w"], _full(3, 256), "w")


def _save_small(rank: int, world: int, disk: str, how: str) -> None:
    if how == "injected":
        _cap_writes(disk, DISK_BYTES)
    ckpt.save(_state(3, rank, 256), f"{disk}/ckpt", step=3, options=ckpt.SaveOptions(overwrite=True))
