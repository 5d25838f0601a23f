"""Persistence: frame chunks as safetensors, checksum, write, and commit through storage.

The commit protocol needs nothing but storage, so the same code runs in a
trainer, in a daemon, or split between them:

1. every rank writes its data object (durable), then ``_staging/<save_id>/rank-NNNNN.json``
   listing its chunks; a rank that fails writes ``rank-NNNNN.error`` instead;
2. the committer (rank 0) waits for every rank's index, writes ``manifest.json``
   in one atomic step, then removes the staging files and any objects of the
   checkpoint it replaced;
3. the other ranks wait until their index is gone (committed) or ``ABORT`` appears.

Until step 2 the location holds no manifest (or the previous one), so a crash at
any point leaves nothing loadable that was not fully written.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
import xxhash

from .errors import SaveAbortedError
from .format import (
    DATA_DIR,
    MANIFEST,
    STAGING_DIR,
    Chunk,
    Manifest,
    TensorRecord,
    dtype_from_name,
    safetensors_code,
)
from .regions import Box
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


@dataclass(frozen=True)
class ChunkSpec:
    """What a data object's header says of one chunk, before its bytes exist."""

    key: str
    box: Box
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.box.numel * self.dtype.itemsize


@dataclass
class StagedChunk:
    """Host bytes of one chunk, ready to persist."""

    spec: ChunkSpec
    data: torch.Tensor  # uint8, contiguous, on CPU


def checksum(buf: memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(buf)


def block_checksums(buf: memoryview, block_bytes: int) -> tuple[str, ...]:
    if len(buf) == 0:
        return (checksum(buf),)
    return tuple(checksum(buf[i : i + block_bytes]) for i in range(0, len(buf), block_bytes))


def as_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")


def safetensors_header(specs: list[ChunkSpec], save_id: str) -> bytes:
    """A safetensors header listing the chunks back to back, padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "ckpt", "save_id": save_id}}
    at = 0
    for c in specs:
        name = f"{c.key}@{','.join(map(str, c.box.offsets))}"
        header[name] = {
            "dtype": safetensors_code(c.dtype),
            "shape": list(c.box.sizes),
            "data_offsets": [at, at + c.nbytes],
        }
        at += c.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return len(raw).to_bytes(8, "little") + raw


def frame_order(chunks: Iterable[StagedChunk]) -> list[StagedChunk]:
    """Widest dtypes first: with an 8-aligned header every chunk then starts at a
    multiple of its item size, so readers can view it in place."""
    return sorted(chunks, key=lambda c: -c.spec.dtype.itemsize)


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
        self.header = safetensors_header(specs, save_id)
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


def write_all(f, buf: memoryview) -> None:
    """Write every byte: raw files may take fewer than offered."""
    while len(buf):
        n = f.write(buf)
        if n is None or n == len(buf):
            return
        buf = buf[n:]


def object_name(save_id: str, rank: int) -> str:
    return f"{DATA_DIR}/{save_id}-r{rank:05d}.safetensors"


def staging_name(save_id: str, name: str) -> str:
    return f"{STAGING_DIR}/{save_id}/{name}"


def rank_index_name(save_id: str, rank: int) -> str:
    return staging_name(save_id, f"rank-{rank:05d}.json")


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
        ordered = frame_order(chunks)
        specs = [c.spec for c in ordered]
        records = write_object(storage, rel, specs, (c.data for c in ordered), save_id, block_bytes, timings)
        add_records(index, rel, specs, records)
    if extra:
        index.update(extra)
    write_rank_index(storage, save_id, rank, index)


def write_rank_index(storage: Storage, save_id: str, rank: int, index: dict[str, Any]) -> None:
    """The durability marker: written only after the rank's objects are durable."""
    storage.put_atomic(rank_index_name(save_id, rank), json.dumps(index).encode())


def add_records(index: dict[str, Any], rel: str, specs: list[ChunkSpec], records: list[Chunk]) -> None:
    """Enter one written object and its chunks into a rank index."""
    index["objects"][rel] = records[-1].offset + records[-1].length if records else 0
    for spec, rec in zip(specs, records):
        index["chunks"].setdefault(spec.key, []).append(rec.to_json())


def report_failure(storage: Storage, save_id: str, rank: int, error: BaseException) -> None:
    """Tell the committer this rank will not finish (best effort). A failing rank 0
    is the committer: it aborts the save itself, or the others would wait out their timeout."""
    reason = f"{type(error).__name__}: {error}"
    try:
        storage.put_atomic(staging_name(save_id, f"rank-{rank:05d}.error"), reason.encode())
        if rank == 0:
            storage.put_atomic(staging_name(save_id, "ABORT"), f"rank failure: rank-00000: {reason}".encode())
    except Exception:
        pass


def poll_cap(storage: Storage) -> float:
    """Longest pause between polls of the commit protocol: short on a local disk; on an
    object store every poll is a request per rank, so back off to a second."""
    return 0.05 if storage.local else 1.0


def commit(storage: Storage, save_id: str, world_size: int, timeout_s: float) -> Manifest:
    """Wait for every rank's index, then write the manifest (the commit point)."""
    names = [f"rank-{r:05d}.json" for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        storage.invalidate()
        present = set(storage.listdir(f"{STAGING_DIR}/{save_id}"))
        errors = sorted(n for n in present if n.endswith(".error"))
        if errors:
            reasons = "; ".join(
                f"{n[:-6]}: {storage.read_bytes(staging_name(save_id, n)).decode(errors='replace')}" for n in errors
            )
            _abort(storage, save_id, f"rank failure: {reasons}")
        missing = [n for n in names if n not in present]
        if not missing:
            break
        if time.monotonic() > deadline:
            waiting = ", ".join(m[:-5] for m in missing)
            _abort(storage, save_id, f"timed out after {timeout_s:.0f}s waiting for {waiting}")
        time.sleep(delay)
        delay = min(delay * 2, poll_cap(storage))

    indexes = [json.loads(storage.read_bytes(staging_name(save_id, n))) for n in names]
    head = indexes[0]
    objects: dict[str, int] = {}
    chunks: dict[str, list[Chunk]] = {}
    for idx in indexes:
        objects.update(idx["objects"])
        for key, recs in idx["chunks"].items():
            chunks.setdefault(key, []).extend(Chunk.from_json(r) for r in recs)
    tensors = {
        key: TensorRecord(
            tuple(meta["shape"]),
            dtype_from_name(meta["dtype"]),
            sorted(chunks.get(key, []), key=lambda c: c.box.offsets),
            meta.get("layout", ""),
        )
        for key, meta in head["tensors"].items()
    }
    manifest = Manifest(
        save_id=save_id,
        tensors=tensors,
        values=head["values"],
        objects=objects,
        block_bytes=head["block_bytes"],
        step=head.get("step"),
        metrics=head.get("metrics") or {},
        metadata=head.get("metadata") or {},
        topology=head.get("topology") or {},
        library_version=head.get("library_version", ""),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    manifest.validate(storage.describe(MANIFEST))
    previous = _committed_objects(storage)
    storage.put_atomic(MANIFEST, manifest.to_json_bytes())
    for rel in sorted(previous - set(objects)):
        storage.delete(rel)
    storage.delete(f"{STAGING_DIR}/{save_id}", recursive=True)
    if not storage.listdir(STAGING_DIR):
        storage.delete(STAGING_DIR, recursive=True)
    return manifest


def _committed_objects(storage: Storage) -> set[str]:
    if not storage.exists(MANIFEST):
        return set()
    try:
        return set(json.loads(storage.read_bytes(MANIFEST))["objects"])
    except (ValueError, KeyError, TypeError):
        return set()


def _abort(storage: Storage, save_id: str, reason: str) -> None:
    storage.put_atomic(staging_name(save_id, "ABORT"), reason.encode())
    raise SaveAbortedError(f"{storage.uri}: save {save_id} not committed: {reason}")


def wait_committed(storage: Storage, save_id: str, rank: int, timeout_s: float) -> None:
    """On a non-committing rank: return once the committer has committed."""
    mine = rank_index_name(save_id, rank)
    abort = staging_name(save_id, "ABORT")
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        storage.invalidate()
        if storage.exists(abort):
            reason = storage.read_bytes(abort).decode(errors="replace")
            raise SaveAbortedError(f"{storage.uri}: save {save_id} not committed: {reason}")
        if not storage.exists(mine):
            return
        if time.monotonic() > deadline:
            raise SaveAbortedError(f"{storage.uri}: save {save_id}: no commit within {timeout_s:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, poll_cap(storage))


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
