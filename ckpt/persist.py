"""Who persists a staged snapshot: a background thread here, or the node's daemon.

Both run :func:`ckpt.engine.persist_rank`; they differ only in where the bytes
live (this process's memory vs. a /dev/shm file the daemon maps) and in what
survives a crash of the trainer.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import TYPE_CHECKING, Protocol

from .engine import PersistJob, Timings, persist_rank

if TYPE_CHECKING:
    from .options import SaveOptions
    from .stage import HostBuffer


class Persister(Protocol):
    name: str
    needs_host_buffer: bool  # even a blocking save must stage (the bytes cross a process)
    needs_shared_memory: bool

    def shm_path(self, tag: str) -> str: ...

    def submit(
        self,
        job: PersistJob,
        timings: Timings,
        release: threading.Lock | None,
        buf: HostBuffer | None = None,
        handoff: Future | None = None,
    ) -> Future:
        """Start persisting; the returned future resolves at the commit. ``handoff`` resolves
        once the save no longer needs this process (the daemon holds its bytes, or it committed)."""
        ...


class PendingFutures:
    """Work still running that must finish before the interpreter shuts down: a script that ends
    right after ``async_save`` returned must not lose the save it started."""

    def __init__(self) -> None:
        self._pending: set[Future] = set()
        self._lock = threading.Lock()

    def track(self, future: Future) -> None:
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)  # at once if it is already done

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def finish(self, timeout: float | None = None) -> None:
        """Wait for everything tracked so far (up to ``timeout`` seconds)."""
        with self._lock:
            pending = list(self._pending)
        futures_wait(pending, timeout=timeout)


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
        self.pending = PendingFutures()

    def shm_path(self, tag: str) -> str:
        raise TypeError("in-process persistence stages into private memory")

    def submit(
        self,
        job: PersistJob,
        timings: Timings,
        release: threading.Lock | None,
        buf: HostBuffer | None = None,
        handoff: Future | None = None,
    ) -> Future:
        def run() -> None:
            try:
                persist_rank(job, timings)
            finally:
                if release is not None:
                    release.release()

        future = self._pool.submit(run)
        self.pending.track(future)
        if handoff is not None:  # this process persists: nothing is handed off before the commit
            future.add_done_callback(lambda f: _settle(handoff, f))
        return future



def _settle(target: Future, source: Future) -> None:
    """Resolve ``target`` as ``source`` resolved."""
    error = source.exception()
    if error is None:
        target.set_result(None)
    else:
        target.set_exception(error)


_in_process: InProcessPersister | None = None
_lock = threading.Lock()


def _finish_at_exit() -> None:
    """Complete in-flight saves before interpreter shutdown. Registered after concurrent.futures'
    own hook, so it runs first (threading runs these hooks in reverse): the save still has the
    hashing and persisting threads it needs, and no ckpt thread is left inside torch while the
    interpreter tears it down."""
    if _in_process is not None:
        _in_process.pending.finish()


threading._register_atexit(_finish_at_exit)


def persister_for(options: SaveOptions) -> Persister:
    global _in_process
    if options.daemon:
        from .client import daemon_persister

        return daemon_persister(options.daemon)
    with _lock:
        if _in_process is None:
            _in_process = InProcessPersister()
        return _in_process
