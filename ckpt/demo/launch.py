"""Processes the demo starts: CPU training ranks (torchrun-like) and a ``ckpt-server`` daemon.

Ranks fork from a forkserver that has imported torch, FSDP and torch._dynamo
once, so a rank starts in milliseconds instead of a fresh interpreter's
seconds of imports; they rendezvous through a FileStore in a temp dir and talk
gloo over loopback: no ports to pick, nothing reachable from outside.
Everything started here dies with the driver: ranks are killed on exit, the
daemon gets SIGKILL from the kernel if the driver dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.tensor",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint.state_dict",
    "torch._dynamo",  # fully_shard imports it lazily: ~1.5 s per rank otherwise
    "ckpt",
    "ckpt.demo.train",
]


def warm_up() -> None:
    """Start the forkserver now (it imports in the background) so ranks start at once later."""
    multiprocessing.set_forkserver_preload(PRELOAD)  # no effect if a forkserver already runs
    multiprocessing.forkserver.ensure_running()


_PR_SET_PDEATHSIG = 1
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _rank_entry(fn: Callable, rank: int, world: int, store: str, err: str, args: tuple) -> None:
    _die_with_parent()  # the forkserver: it exits when the driver does
    os.environ["OMP_NUM_THREADS"] = "1"
    if os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # rank-to-rank traffic stays on loopback
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        with open(err, "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        dist.destroy_process_group()


class RankError(RuntimeError):
    """A rank of a demo job failed; the message carries its traceback."""


@dataclass
class Job:
    """``world`` ranks running ``fn(rank, world, *args)``."""

    name: str
    world: int
    workdir: str
    procs: list[multiprocessing.Process] = field(default_factory=list)
    killed: bool = False

    @classmethod
    def start(cls, name: str, fn: Callable, world: int, workdir: str, *args: Any) -> Job:
        os.makedirs(workdir, exist_ok=True)
        job = cls(name, world, workdir)
        ctx = multiprocessing.get_context("forkserver")
        store = os.path.join(workdir, f"{name}.store")
        for r in range(world):
            p = ctx.Process(target=_rank_entry, args=(fn, r, world, store, job._err(r), args), name=f"{name}-r{r}")
            p.start()
            job.procs.append(p)
        return job

    def _err(self, rank: int) -> str:
        return os.path.join(self.workdir, f"{self.name}-rank{rank}.err")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def check(self) -> bool:
        """True once every rank exited cleanly; raises RankError if one failed."""
        for r, p in enumerate(self.procs):
            if p.exitcode not in (None, 0):
                self.kill()
                detail = ""
                if os.path.exists(self._err(r)):
                    with open(self._err(r)) as f:
                        detail = f.read()
                raise RankError(f"{self.name}: rank {r} exited with {p.exitcode}\n{detail}")
        return all(p.exitcode == 0 for p in self.procs)

    def wait(self, timeout_s: float) -> None:
        """Until every rank exited cleanly; on a failure, a timeout or Ctrl-C the ranks are killed."""
        deadline = time.monotonic() + timeout_s
        try:
            while not self.check():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} on {self.world} ranks did not finish in {timeout_s:.0f}s")
                time.sleep(0.05)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL every rank still running (no cleanup runs in them, as in a node failure)."""
        self.killed = True
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.join()


# --- the daemon ------------------------------------------------------------------------------------


@dataclass
class Daemon:
    """A ``ckpt-server`` on a Unix socket, with its JSON log."""

    proc: subprocess.Popen
    socket: str
    log_path: str
    ram_dir: str

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    @classmethod
    def start(cls, socket: str, log_path: str, ram_dir: str) -> Daemon:
        """Launch it (returns at once; ``wait_ready`` before the first save)."""
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "ckpt_server.main", "--socket", socket, "--ram-tier-dir", ram_dir]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent, close_fds=True
            )
        return cls(proc, socket, log_path, ram_dir)

    def logs(self) -> list[dict[str, Any]]:
        from ckpt_server.main import read_json_log

        return read_json_log(self.log_path)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(r.get("msg") == "ready" for r in self.logs()):
            if self.proc.poll() is not None:
                with open(self.log_path, errors="replace") as f:
                    raise RuntimeError(f"ckpt-server exited ({self.proc.returncode}):\n{f.read()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"ckpt-server was not ready within {timeout_s:.0f}s")
            time.sleep(0.05)

    def queue_depth(self) -> int:
        """Persist jobs accepted and not finished (the daemon's own gauge)."""
        import grpc

        from ckpt._proto import ckpt_pb2, ckpt_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            text = ckpt_pb2_grpc.CheckpointerStub(channel).Metrics(ckpt_pb2.MetricsRequest(), timeout=10).text
        for line in text.splitlines():
            if line.startswith("ckpt_queue_depth "):
                return int(float(line.split()[1]))
        raise RuntimeError("ckpt-server reported no ckpt_queue_depth")

    def wait_idle(self, timeout_s: float) -> float:
        """Block until it has finished every accepted job; the seconds waited."""
        t0 = time.monotonic()
        while self.queue_depth() > 0:
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"ckpt-server still persisting after {timeout_s:.0f}s")
            time.sleep(0.02)
        return time.monotonic() - t0

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (it drains, then exits); SIGKILL if it does not."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def remove_orphan_buffers(pids: list[int]) -> int:
    """Remove the shared-memory staging buffers of killed trainers; the bytes freed.

    A trainer removes its own at exit, and the daemon removes one whose trainer
    died while it was persisting from it; a buffer that was idle at the kill
    has nobody left to remove it.
    """
    freed = 0
    if not os.path.isdir("/dev/shm"):
        return 0
    prefixes = tuple(f"ckpt-{pid}-" for pid in pids)
    for name in os.listdir("/dev/shm"):
        if name.startswith(prefixes):
            path = os.path.join("/dev/shm", name)
            try:
                freed += os.path.getsize(path)
                os.unlink(path)
            except FileNotFoundError:
                pass
    return freed
