"""Real ``ckpt-server`` processes for tests: start, wait until ready, read logs, stop.

Each daemon is the installed console script, listening on a Unix socket in its
own short temp dir (socket paths are limited to ~107 bytes) and, when asked, on
TCP 127.0.0.1 with a kernel-chosen port read back from its structured log. A
daemon never outlives the test: it is stopped with SIGTERM, then SIGKILL, and
the kernel kills it if the test process itself dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from ckpt_server.main import read_json_log
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ckpt._proto import ckpt_pb2, ckpt_pb2_grpc

START_TIMEOUT_S = 90.0  # a cold interpreter importing torch and grpc on a loaded 2-core box
PR_SET_PDEATHSIG = 1


def server_command() -> list[str]:
    """The ``ckpt-server`` console script installed beside this interpreter."""
    script = os.path.join(os.path.dirname(sys.executable), "ckpt-server")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "ckpt_server.main"]


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Daemon:
    """One running ckpt-server and what it announced in its log."""

    proc: subprocess.Popen
    socket: str
    log_path: str
    args: tuple[str, ...]
    tcp: str | None = None  # "127.0.0.1:PORT" when started with --listen
    metrics_url: str | None = None
    _dir: str | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> list[dict]:
        """The JSON log records so far (non-JSON lines, e.g. a traceback, are skipped)."""
        return read_json_log(self.log_path)

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_log(self, msg: str, timeout: float = START_TIMEOUT_S, count: int = 1) -> dict:
        """The ``count``-th record with this message, waiting for it to be written."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.logs() if r.get("msg") == msg]
            if len(found) >= count:
                return found[count - 1]
            if not self.alive():
                code = self.proc.returncode
                raise AssertionError(f"ckpt-server exited ({code}) before logging {msg!r}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"ckpt-server did not log {msg!r} within {timeout:.0f}s:\n{self.log_text()}")
            time.sleep(0.02)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain, then exit); the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> int:
        """SIGKILL: the daemon gets no chance to clean up."""
        if self.alive():
            self.proc.kill()
        return self.proc.wait(30)

    def restart(self) -> Daemon:
        """Start a new daemon with the same arguments on the same socket path (after a kill)."""
        assert not self.alive(), "restart() replaces a daemon that is gone"
        new = start_daemon(*self.args, socket=self.socket)
        new._dir, self._dir = self._dir, None
        return new

    def stop(self) -> None:
        """Make sure it is gone: SIGTERM, then SIGKILL if it does not exit in time."""
        try:
            self.terminate(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def start_daemon(*args: str, socket: str | None = None, env: dict[str, str] | None = None) -> Daemon:
    """Start ``ckpt-server`` with ``args`` and return once it logged ``ready``.

    ``socket`` reuses a path (e.g. to restart a killed daemon where its clients
    expect it); otherwise a fresh one is made.
    """
    return start_daemons([list(args)], socket=socket, env=env)[0]


def start_daemons(
    arg_lists: list[list[str]], socket: str | None = None, env: dict[str, str] | None = None
) -> list[Daemon]:
    """Start several daemons at once (their slow interpreter start-ups overlap); all ready, or none left."""
    daemons = [_launch(args, socket, env) for args in arg_lists]
    try:
        for d in daemons:
            d.wait_log("ready")
            if "--listen" in d.args:
                d.tcp = d.wait_log("listening")["tcp"]
            if "--metrics-port" in d.args:
                d.metrics_url = f"http://{d.wait_log('metrics')['http']}/metrics"
    except BaseException:
        for d in daemons:
            d.stop()
        raise
    return daemons


def _launch(args: list[str], socket: str | None, env: dict[str, str] | None) -> Daemon:
    own_dir = None
    if socket is None:
        own_dir = tempfile.mkdtemp(prefix="ckd-", dir="/tmp")
        socket = os.path.join(own_dir, "d.sock")
    log_fd, log_path = tempfile.mkstemp(prefix="ckpt-server-", suffix=".log", dir=own_dir or os.path.dirname(socket))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with os.fdopen(log_fd, "w") as log:
        proc = subprocess.Popen(
            [*server_command(), "--socket", socket, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            preexec_fn=_die_with_parent,
        )
    return Daemon(proc, socket, log_path, tuple(args), _dir=own_dir)


def stop_all(daemons: list[Daemon]) -> None:
    """Stop several daemons, draining in parallel (SIGTERM to all first)."""
    for d in daemons:
        if d.alive():
            d.proc.send_signal(signal.SIGTERM)
    for d in daemons:
        d.stop()


@contextmanager
def running_daemon(*args: str, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    d = start_daemon(*args, env=env)
    try:
        yield d
    finally:
        d.stop()


# -- talking to a daemon directly ----------------------------------------------------------------


def _metadata(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


def health_status(address: str, service: str = "", token: str | None = None) -> str:
    """The grpc.health.v1 status name (SERVING, NOT_SERVING, ...)."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10, metadata=_metadata(token)
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def metrics_rpc(address: str, token: str | None = None) -> str:
    with grpc.insecure_channel(address) as channel:
        return (
            ckpt_pb2_grpc.CheckpointerStub(channel)
            .Metrics(ckpt_pb2.MetricsRequest(), timeout=10, metadata=_metadata(token))
            .text
        )


def metrics_http(url: str) -> tuple[str, str]:
    """(Content-Type, body) of the daemon's Prometheus endpoint."""
    assert url.startswith("http://127.0.0.1:"), url  # never any other address
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.headers.get("Content-Type", ""), r.read().decode()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition, ``name{labels}`` -> value; every
    non-comment line must parse, as a scraper would require."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


# -- files the daemon path leaves on the node --------------------------------------------------


def shm_files_of(pid: int) -> list[str]:
    """Staging buffers in /dev/shm that belong to trainer process ``pid``."""
    return glob.glob(f"/dev/shm/ckpt-{pid}-*")


def remove_shm_files_of(pids: list[int]) -> None:
    for pid in pids:
        for path in shm_files_of(pid):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll until ``predicate()`` is truthy; its value, or AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
