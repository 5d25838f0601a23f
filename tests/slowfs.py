"""A local directory behind a shared, bandwidth-limited link, as an fsspec filesystem (``slowfs://``).

Tests and benchmarks that must see what a load reads from a remote store use it: every byte read
through it (``cat_file`` ranges, which ckpt's generic backend issues, and reads of opened files,
which DCP's ``FsspecReader`` issues) is counted per object in this process (:data:`COUNTS`) and,
with ``state=PATH``, in a file every process shares (:func:`total`). With ``rate`` (bytes/s) the
reads of all processes naming the same ``state`` file queue on one link of that bandwidth: each
read reserves the link for ``n / rate`` seconds after the reads before it (a FIFO token bucket
kept in the file under ``flock``) and returns when its turn ends; ``latency_s`` is added before
each request's turn, as a request's round trip to an object store. Writes are not throttled.

``import slowfs`` registers the protocol; pass the settings as storage options
(``ckpt.LoadOptions(storage_options={"rate": 200e6, "state": path})``, ``FsspecReader(url, rate=...)``).
ckpt treats any fsspec filesystem but the local one as remote (``Storage.is_remote``).
"""

from __future__ import annotations

import fcntl
import io
import os
import struct
import time
from collections import Counter
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

COUNTS: Counter[str] = Counter()  # bytes read per object (local path) by this process
_STATE = struct.Struct("<dQQ")  # next free time of the link (CLOCK_MONOTONIC), bytes, requests


def total(state: str) -> tuple[int, int]:
    """(bytes, requests) read by every process through ``state``."""
    with open(state, "rb") as f:
        raw = f.read()
    _, nbytes, requests = _STATE.unpack(raw) if len(raw) == _STATE.size else (0.0, 0, 0)
    return nbytes, requests


def reset(state: str) -> None:
    with open(state, "wb") as f:
        f.write(_STATE.pack(0.0, 0, 0))


class SlowFileSystem(AbstractFileSystem):
    protocol = "slowfs"
    root_marker = "/"

    def __init__(self, rate: float = 0.0, latency_s: float = 0.0, state: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local = LocalFileSystem()
        self.rate, self.latency_s, self.state = float(rate), float(latency_s), state

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        if path.startswith("slowfs://"):
            path = path[len("slowfs://") :]
        return LocalFileSystem._strip_protocol(path)

    # -- reads: counted and throttled --------------------------------------------------------------

    def took(self, path: str, n: int) -> None:
        """Account ``n`` bytes read from ``path``; wait for this read's turn on the link."""
        COUNTS[path] += n
        if self.state is None:
            return
        fd = os.open(self.state, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, _STATE.size, 0)
            free, nbytes, requests = _STATE.unpack(raw) if len(raw) == _STATE.size else (0.0, 0, 0)
            now = time.monotonic()
            done = max(now + self.latency_s, free) + (n / self.rate if self.rate else 0.0)
            os.pwrite(fd, _STATE.pack(done if self.rate else free, nbytes + n, requests + 1), 0)
        finally:
            os.close(fd)  # releases the lock
        if done > now:
            time.sleep(done - now)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        path = self._strip_protocol(path)
        with open(path, "rb") as f:
            if start:
                f.seek(start if start >= 0 else max(0, os.fstat(f.fileno()).st_size + start))
            data = f.read() if end is None else f.read(max(0, end - (start or 0)))
        self.took(path, len(data))
        return data

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if "r" in mode and "+" not in mode:
            return _SlowFile(open(path, "rb"), self, path)
        self.local.makedirs(self.local._parent(path), exist_ok=True)
        return open(path, mode)

    # -- everything else: the local filesystem -----------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list:
        return self.local.ls(self._strip_protocol(path), detail=detail)

    def info(self, path: str, **kwargs: Any) -> dict:
        return self.local.info(self._strip_protocol(path))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.local.mkdir(self._strip_protocol(path), create_parents=create_parents)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        self.local.pipe_file(self._strip_protocol(path), value)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        self.local.rm(self._strip_protocol(path), recursive=recursive)

    def rm_file(self, path: str) -> None:
        self.local.rm_file(self._strip_protocol(path))

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        self.local.mv(self._strip_protocol(path1), self._strip_protocol(path2))


class _SlowFile(io.RawIOBase):
    """A local file whose reads go through the link."""

    def __init__(self, f: Any, fs: SlowFileSystem, path: str) -> None:
        self.f, self.fs, self.path = f, fs, path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)
        self.fs.took(self.path, n or 0)
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


fsspec.register_implementation("slowfs", SlowFileSystem, clobber=True)
