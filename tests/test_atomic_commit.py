"""Atomic commit under failure: a rank SIGKILLed while writing its data object, or
raising mid-write, leaves nothing new loadable, makes every surviving rank raise
(no hang), and never damages a committed checkpoint, be it a sibling directory
or the very checkpoint the failed save was overwriting.

The kill is real: the victim rank's storage writes stall halfway through its
data object, it reports its pid, and the test process sends SIGKILL, so no
``finally``, atexit or error report of the victim runs.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from dist import run_ranks, run_ranks_outcomes
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import ckpt
from ckpt.storage import LocalStorage

pytestmark = [pytest.mark.dist, pytest.mark.faults]

WORLD = 3
SHAPES = {"w": ((50, 64), torch.float32), "emb": ((33, 20), torch.bfloat16), "rep": ((40,), torch.int64)}
COMMIT_TIMEOUT_S = 3.0


def reference(version: int, key: str) -> torch.Tensor:
    shape, dtype = SHAPES[key]
    g = torch.Generator().manual_seed(zlib.crc32(f"v{version}/{key}".encode()))
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g).to(dtype)


def state(version: int, rank: int, world: int, mesh) -> dict:
    """Version ``version`` of the state: a Shard(0) DTensor (uneven over 3), a flat
    ZeRO-style shard, a replicated tensor and a JSON step."""
    w = distribute_tensor(reference(version, "w"), mesh, [Shard(0)], src_data_rank=None)
    emb = reference(version, "emb").reshape(-1)
    lo, hi = emb.numel() * rank // world, emb.numel() * (rank + 1) // world
    return {
        "w": w,
        "emb": ckpt.Sharded.flat(emb[lo:hi].clone(), SHAPES["emb"][0], lo),
        "rep": reference(version, "rep"),
        "step": version,
    }


def assert_holds(path: str, version: int) -> None:
    """Load ``path`` whole on one process and compare bitwise with ``version``."""
    target = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in SHAPES.items()}
    target["step"] = -1
    manifest = ckpt.load(target, path)
    for key in SHAPES:
        ref = reference(version, key)
        assert torch.equal(target[key].view(-1).view(torch.uint8), ref.view(-1).view(torch.uint8)), (path, key)
    assert target["step"] == version and manifest.step == version


class _StallingFile:
    """Writes half of the first data chunk it is given, makes it durable, reports
    this process's pid, then blocks until the test kills the process."""

    def __init__(self, f, marker: str) -> None:
        self.f, self.marker, self.calls = f, marker, 0

    def write(self, buf) -> int:
        self.calls += 1
        if self.calls == 1:  # the safetensors header
            return self.f.write(buf)
        half = memoryview(buf)[: len(buf) // 2]
        self.f.write(half)
        os.fsync(self.f.fileno())
        Path(self.marker + ".tmp").write_text(str(os.getpid()))
        os.replace(self.marker + ".tmp", self.marker)
        time.sleep(120)  # SIGKILL arrives here
        raise AssertionError("the victim rank was not killed")


class _FailingFile:
    """Writes half of the first data chunk, then fails like a full disk."""

    def __init__(self, f) -> None:
        self.f, self.calls = f, 0

    def write(self, buf) -> int:
        self.calls += 1
        if self.calls == 1:
            return self.f.write(buf)
        self.f.write(memoryview(buf)[: len(buf) // 2])
        raise OSError(28, "injected: no space left on device")


def _wrap_data_writes(wrap) -> None:
    """Make this process's writes of data objects go through ``wrap(file)``."""
    original = LocalStorage.open_write

    def open_write(self, rel):
        from contextlib import contextmanager

        @contextmanager
        def cm():
            with original(self, rel) as f:
                yield wrap(f) if rel.startswith("data/") else f

        return cm()

    LocalStorage.open_write = open_write


def kill_job(rank: int, world: int, root: str, victim: int, target: str, overwrite: bool) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    v1 = state(1, rank, world, mesh)
    ckpt.save(v1, f"{root}/A", step=1)
    ckpt.save(v1, f"{root}/B", step=1)
    if rank == victim:
        _wrap_data_writes(lambda f: _StallingFile(f, f"{root}/victim.pid"))
    options = ckpt.SaveOptions(overwrite=overwrite, commit_timeout_s=COMMIT_TIMEOUT_S)
    t0 = time.monotonic()
    try:
        ckpt.save(state(2, rank, world, mesh), f"{root}/{target}", step=2, options=options)
    except ckpt.SaveAbortedError as e:
        return {"error": type(e).__name__, "message": str(e), "elapsed": time.monotonic() - t0}
    return {"error": None, "elapsed": time.monotonic() - t0}


def save_job(rank: int, world: int, path: str, version: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    ckpt.save(state(version, rank, world, mesh), path, step=version, options=ckpt.SaveOptions(overwrite=True))


def _declared_and_actual_size(path: Path) -> tuple[int, int]:
    """(size its safetensors header promises, size on disk) of a data object."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    return 8 + n + end, len(raw)


class _Killer(threading.Thread):
    """Waits for the victim's pid file and SIGKILLs it, noting what it saw on disk."""

    def __init__(self, marker: Path, data_dir: Path, victim: int) -> None:
        super().__init__(daemon=True)
        self.marker, self.data_dir, self.victim = marker, data_dir, victim
        self.killed_pid: int | None = None
        self.sizes: list[tuple[int, int]] = []  # (declared, on disk) of the victim's objects

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.marker.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        pid = int(self.marker.read_text())
        self.sizes = [_declared_and_actual_size(p) for p in self.data_dir.glob(f"*-r{self.victim:05d}.safetensors")]
        os.kill(pid, signal.SIGKILL)
        self.killed_pid = pid


@pytest.mark.parametrize(
    "victim,overwrite",
    [(2, False), (0, True), (1, True)],
    ids=["worker-killed-new-dir", "committer-killed-overwrite", "worker-killed-overwrite"],
)
def test_sigkilled_rank_mid_write_commits_nothing(tmp_path: Path, victim: int, overwrite: bool) -> None:
    target = "B" if overwrite else "C"
    killer = _Killer(tmp_path / "victim.pid", tmp_path / target / "data", victim)
    killer.start()
    outcomes = run_ranks_outcomes(
        kill_job, WORLD, str(tmp_path), victim, target, overwrite, timeout=90, start_method="forkserver"
    )
    killer.join(timeout=5)

    report = "\n".join(f"rank {o.rank}: {o.status} (exit {o.exitcode}): {o.value}" for o in outcomes)
    assert killer.killed_pid is not None, f"the victim never stalled mid-write:\n{report}"
    # The victim died of the SIGKILL while its data object was half written.
    assert outcomes[victim].status == "died" and outcomes[victim].exitcode == -signal.SIGKILL, report
    # (An overwritten checkpoint also holds the victim's committed, complete object.)
    partial = [(declared, actual) for declared, actual in killer.sizes if actual < declared]
    assert len(partial) == 1 and len(killer.sizes) == 1 + overwrite, killer.sizes
    for o in outcomes:
        if o.rank == victim:
            continue
        assert o.status == "ok", report
        assert o.value["error"] == "SaveAbortedError", f"rank {o.rank} did not abort: {o.value}"
        assert o.value["elapsed"] < COMMIT_TIMEOUT_S + 20, o.value
    if victim != 0:  # the committer names the rank it waited for
        assert f"rank-{victim:05d}" in outcomes[0].value["message"]

    # Nothing of the failed save is loadable; committed checkpoints are intact.
    assert_holds(str(tmp_path / "A"), 1)
    if overwrite:
        assert_holds(str(tmp_path / "B"), 1)
    else:
        assert (tmp_path / "C" / "data").is_dir()  # partial bytes are there ...
        with pytest.raises(ckpt.CheckpointNotFoundError, match="no committed checkpoint"):
            ckpt.load({"w": torch.zeros(SHAPES["w"][0])}, str(tmp_path / "C"), strict=False)

    # The leftovers do not block a later save to the same place (on another world size).
    run_ranks(save_job, 2, str(tmp_path / target), 3, start_method="forkserver", timeout=90)
    assert_holds(str(tmp_path / target), 3)
    assert_holds(str(tmp_path / "A"), 1)


def raise_job(rank: int, world: int, root: str, culprit: int, where: str) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    ckpt.save(state(1, rank, world, mesh), f"{root}/A", step=1)
    original = LocalStorage.open_write
    v2 = state(2, rank, world, mesh)
    if rank == culprit and where == "write":
        _wrap_data_writes(_FailingFile)
    if rank == culprit and where == "stage":  # its shard has no data: copying it to host fails
        emb = v2["emb"]
        v2["emb"] = ckpt.Sharded(torch.empty_like(emb.tensor, device="meta"), emb.global_shape, emb.parts)
    # A long commit timeout: every rank must learn of the failure from storage, not by timing out.
    options = ckpt.SaveOptions(commit_timeout_s=60)
    t0 = time.monotonic()
    result: dict = {"error": None}
    try:
        ckpt.save(v2, f"{root}/X", step=2, options=options)
    except Exception as e:
        result = {"error": type(e).__name__, "message": str(e)}
        result["failed_rank"], result["cause"] = getattr(e, "rank", None), getattr(e, "cause", None)
    result["elapsed"] = time.monotonic() - t0
    LocalStorage.open_write = original
    # The same processes save again (reusing the cached plan): a failed save poisons nothing.
    ckpt.save(state(3, rank, world, mesh), f"{root}/Y", step=3)
    return result


@pytest.mark.parametrize(
    "culprit,where,error,why",
    [
        (1, "write", "StorageFullError", "injected"),
        (0, "write", "StorageFullError", "injected"),
        (2, "stage", "NotImplementedError", "meta"),
    ],
    ids=["worker-raises-writing", "committer-raises-writing", "worker-raises-staging"],
)
def test_rank_raising_mid_save_fails_every_rank(tmp_path: Path, culprit: int, where: str, error: str, why: str) -> None:
    results = run_ranks(raise_job, WORLD, str(tmp_path), culprit, where, start_method="forkserver", timeout=150)
    for rank, r in enumerate(results):
        assert r["elapsed"] < 20, f"rank {rank} took {r['elapsed']:.1f}s to fail: {r}"
        if rank == culprit:
            assert r["error"] == error and why in r["message"], r
        else:
            # Every rank is told which rank failed and why, as fields and in the message.
            assert r["error"] == "SaveAbortedError", f"rank {rank}: {r}"
            assert r["failed_rank"] == culprit and r["cause"] == error, f"rank {rank}: {r}"
            assert why in r["message"] and f"rank {culprit}: {error}" in r["message"], f"rank {rank}: {r['message']}"
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.load({"w": torch.zeros(SHAPES["w"][0])}, str(tmp_path / "X"), strict=False)
    assert_holds(str(tmp_path / "A"), 1)
    assert_holds(str(tmp_path / "Y"), 3)
