"""Who persists a staged snapshot: a background thread here, or the node's daemon.

Both run :func:`ckpt.engine.persist_rank`; they differ only in where the bytes
live (this process's memory vs. a /dev/shm file the daemon maps) and in what
survives a crash of the trainer.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from .engine import PersistJob, Timings, persist_rank

if TYPE_CHECKING:
    from .save import SaveOptions
    from .stage import HostBuffer


class Persister(Protocol):
    name: str
    needs_host_buffer: bool  # even a blocking save must stage (the bytes cross a process)
    needs_shared_memory: bool

    def shm_path(self, tag: str) -> str: ...

    def submit(
        self, job: PersistJob, timings: Timings, release: threading.Lock | None, buf: HostBuffer | None = None
    ) -> Future: ...


class InProcessPersister:
    """Persists in one background thread: saves of this process complete in order.

    Writing is I/O that releases the GIL, and no collective runs here, so it
    neither starves nor deadlocks the training loop.
    """

    name = "thread"
    needs_host_buffer = False
    needs_shared_memory = False

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-persist")

    def shm_path(self, tag: str) -> str:
        raise TypeError("in-process persistence stages into private memory")

    def submit(
        self, job: PersistJob, timings: Timings, release: threading.Lock | None, buf: HostBuffer | None = None
    ) -> Future:
        def run() -> None:
            try:
                persist_rank(job, timings)
            finally:
                if release is not None:
                    release.release()

        return self._pool.submit(run)


_in_process: InProcessPersister | None = None
_lock = threading.Lock()


def persister_for(options: SaveOptions) -> Persister:
    global _in_process
    if options.daemon:
        from .client import daemon_persister

        return daemon_persister(options.daemon)
    with _lock:
        if _in_process is None:
            _in_process = InProcessPersister()
        return _in_process
