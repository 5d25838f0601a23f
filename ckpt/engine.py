"""Persisting one rank's share of a save: the object writer, and the glue to the commit protocol.

:class:`ObjectWriter` streams chunks into one data object (framed by
:mod:`ckpt.framing`, checksummed as the bytes go out); :func:`persist_rank`
writes a rank's object and index, then commits or waits through
:mod:`ckpt.commit`. The same code runs in a trainer's background thread and in
the daemon.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .commit import add_records, commit, report_failure, wait_committed, write_rank_index
from .format import DATA_DIR, Chunk
from .framing import ChunkSpec, as_bytes, block_checksums, frame_order, object_header, write_all
from .storage import Storage


class Timings(dict):
    """Seconds per phase (plan, stage, serialize, upload, commit), accumulated."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class StagedChunk:
    """Host bytes of one chunk, ready to persist."""

    spec: ChunkSpec
    data: torch.Tensor  # uint8, contiguous, on CPU


_OVERLAP_BYTES = 1 << 20  # smaller chunks are hashed inline: a thread hop would cost more
_WRITEBACK_BYTES = 16 << 20  # ask for writeback after this many new bytes
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(2, thread_name_prefix="ckpt-hash")
        return _pool


def _forget_pool() -> None:
    """A forked child has none of the parent's threads: it starts its own pool."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


class ObjectWriter:
    """One data object being written: the header first, then each chunk in order.

    Push-style so a producer can stream chunks without holding them all;
    the object is durable when the ``with`` block exits cleanly.
    """

    def __init__(
        self,
        storage: Storage,
        rel: str,
        specs: list[ChunkSpec],
        save_id: str,
        block_bytes: int,
        timings: Timings | None = None,
    ) -> None:
        self.storage, self.rel, self.specs, self.block_bytes = storage, rel, specs, block_bytes
        self.timings = timings if timings is not None else Timings()
        self.header = object_header(specs, save_id)
        self.records: list[Chunk] = []
        self._at = len(self.header)

    def __enter__(self) -> ObjectWriter:
        self._ctx = self.storage.open_write(self.rel)
        self._f = self._ctx.__enter__()
        write_all(self._f, memoryview(self.header))
        self._unflushed = 0  # offset from which bytes may still be only in the page cache
        return self

    def add(self, data: torch.Tensor) -> None:
        """Append the next chunk's bytes (a contiguous CPU tensor); ``data`` is
        no longer read once this returns.

        A large chunk is checksummed in a helper thread while this one writes
        it (xxh3 and write() both release the GIL), so a disk-bound save hides
        its hashing; "serialize" times only the hashing the write did not hide.
        """
        if len(self.records) == len(self.specs):
            raise ValueError(f"{self.rel}: more chunks than declared")
        spec = self.specs[len(self.records)]
        buf = as_bytes(data) if data.numel() else memoryview(b"")
        if len(buf) != spec.nbytes:
            raise ValueError(f"{spec.key} chunk {spec.box}: got {len(buf)} bytes, expected {spec.nbytes}")
        pending = _hash_pool().submit(block_checksums, buf, self.block_bytes) if len(buf) >= _OVERLAP_BYTES else None
        try:
            with self.timings.phase("upload"):
                write_all(self._f, buf)
        except BaseException:
            if pending is not None:
                futures.wait([pending])  # the caller may reuse ``data`` once this returns
            raise
        with self.timings.phase("serialize"):
            sums = pending.result() if pending is not None else block_checksums(buf, self.block_bytes)
        self.records.append(Chunk(spec.box, self.rel, self._at, len(buf), sums))
        self._at += len(buf)
        if self._at - self._unflushed >= _WRITEBACK_BYTES:
            self.storage.start_writeback(self._f, self._unflushed, self._at)
            self._unflushed = self._at

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and len(self.records) != len(self.specs):
            exc = ValueError(f"{self.rel}: {len(self.records)} of {len(self.specs)} chunks written")
            self._ctx.__exit__(ValueError, exc, None)
            raise exc
        with self.timings.phase("upload"):  # closing makes it durable: fsync, or the last part's PUT
            self._ctx.__exit__(exc_type, exc, tb)


def write_object(
    storage: Storage,
    rel: str,
    specs: list[ChunkSpec],
    datas: Iterable[torch.Tensor],
    save_id: str,
    block_bytes: int,
    timings: Timings | None = None,
) -> list[Chunk]:
    """Write one data object from ``datas`` (one tensor per spec, in order);
    return where each chunk landed and its block checksums."""
    with ObjectWriter(storage, rel, specs, save_id, block_bytes, timings) as w:
        for data in datas:
            w.add(data)
    return w.records


def object_name(save_id: str, rank: int) -> str:
    return f"{DATA_DIR}/{save_id}-r{rank:05d}.safetensors"


def write_rank(
    storage: Storage,
    save_id: str,
    rank: int,
    chunks: list[StagedChunk],
    block_bytes: int,
    extra: dict[str, Any] | None = None,
    timings: Timings | None = None,
) -> None:
    """Persist this rank's chunks and then its index (the durability marker)."""
    index: dict[str, Any] = {"rank": rank, "objects": {}, "chunks": {}}
    if chunks:
        rel = object_name(save_id, rank)
        ordered = frame_order(chunks, lambda c: c.spec.dtype)
        specs = [c.spec for c in ordered]
        records = write_object(storage, rel, specs, (c.data for c in ordered), save_id, block_bytes, timings)
        add_records(index, rel, specs, records)
    if extra:
        index.update(extra)
    write_rank_index(storage, save_id, rank, index)


@dataclass
class PersistJob:
    """Everything needed to persist one rank's share of a save, wherever it runs
    (a trainer's background thread or the daemon)."""

    storage: Storage
    save_id: str
    rank: int
    world_size: int
    chunks: list[StagedChunk]
    block_bytes: int
    head: dict[str, Any] | None  # rank 0 only: what the manifest needs beyond chunks
    commit_timeout_s: float


def persist_rank(job: PersistJob, timings: Timings) -> None:
    """Write the rank's data and index; rank 0 then commits, the others wait for it."""
    try:
        write_rank(job.storage, job.save_id, job.rank, job.chunks, job.block_bytes, job.head, timings)
    except BaseException as e:
        report_failure(job.storage, job.save_id, job.rank, e)
        raise
    with timings.phase("commit"):
        if job.rank == 0:
            commit(job.storage, job.save_id, job.world_size, job.commit_timeout_s)
        else:
            wait_committed(job.storage, job.save_id, job.rank, job.commit_timeout_s)
