"""Persisting one rank's share of a save: the object writer, and the glue to the commit protocol.

:class:`ObjectWriter` streams chunks into one data object (framed by
:mod:`ckpt.framing`, checksummed as the bytes go out); :func:`persist_rank`
writes a rank's object and index, then commits or waits through
:mod:`ckpt.commit`. The same code runs in a trainer's background thread and in
the daemon. A rank's :class:`Encoding` (from ``SaveOptions``, carried in the job's
head as JSON) adds content digests, references to an earlier checkpoint's
identical chunks (:mod:`ckpt.refs`) and compression (:mod:`ckpt.codec`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from . import codec, refs
from .commit import add_records, commit, report_failure, wait_committed, write_object_index, write_rank_index
from .errors import StorageFullError
from .format import Chunk, dtype_name, object_name
from .framing import ChunkSpec, as_bytes, block_checksums, checksum, frame_order, object_header, write_all
from .liveness import Heartbeat, start_heartbeat
from .storage import Storage

log = logging.getLogger(__name__)


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


MIN_COMPRESSED_BYTES = 4096  # smaller chunks are stored raw
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

    ``header_last``: ``specs`` give each encoded chunk its raw size as ``stored`` (an upper
    bound). Where the file can seek back, the header is reserved at that bound's length and
    written last, with the real stored sizes (padded): encoded chunks then go out frame by
    frame as they are compressed (:meth:`add_frames`), while the disk writes back the earlier
    ones. Elsewhere (object stores stream) ``header_last`` turns False on entry and the caller
    :meth:`declare` s the real specs before the first chunk.
    """

    def __init__(
        self,
        storage: Storage,
        rel: str,
        specs: list[ChunkSpec],
        save_id: str,
        block_bytes: int,
        timings: Timings | None = None,
        header_last: bool = False,
    ) -> None:
        self.storage, self.rel, self.specs, self.block_bytes = storage, rel, list(specs), block_bytes
        self.save_id, self.header_last = save_id, header_last
        self._declared = not header_last  # the header is final (written on entry)
        self.timings = timings if timings is not None else Timings()
        self.header = object_header(specs, save_id)
        self.records: list[Chunk] = []
        self._at = len(self.header)

    def __enter__(self) -> ObjectWriter:
        self._ctx = self.storage.open_write(self.rel)
        self._f = self._ctx.__enter__()
        try:
            requested, self.header_last = self.header_last, self.header_last and _seekable(self._f)
            if self.header_last:
                self._f.seek(len(self.header))  # reserved: written at the end
            elif not requested:
                write_all(self._f, memoryview(self.header))
        except BaseException as e:  # the storage's block must see it (clean-up, error naming)
            if not self._ctx.__exit__(type(e), e, e.__traceback__):
                raise
        self._unflushed = 0  # offset from which bytes may still be only in the page cache
        return self

    def declare(self, specs: list[ChunkSpec]) -> None:
        """The real specs of a ``header_last`` writer that cannot seek: written now, before any chunk."""
        if self.records or self.header_last or self._declared:
            raise ValueError(f"{self.rel}: declare() comes before the first chunk of a streaming writer")
        self.specs, self.header, self._declared = list(specs), object_header(specs, self.save_id), True
        self._at = len(self.header)
        write_all(self._f, memoryview(self.header))

    def add_encoded(self, enc: codec.Encoded, digest: str | None = None) -> None:
        """Append the next chunk, encoded (its spec says how many bytes it stores)."""
        spec = self.specs[len(self.records)]
        if spec.stored != enc.codec.stored:
            raise ValueError(f"{spec.key} chunk {spec.box}: {enc.codec.stored} encoded bytes, declared {spec.stored}")
        with self.timings.phase("upload"):
            for frame in enc.frames:
                write_all(self._f, memoryview(frame))
        self.records.append(Chunk(spec.box, self.rel, self._at, spec.nbytes, enc.checksums, enc.codec, digest))
        self._at += enc.codec.stored
        self._writeback()

    def add_frames(self, frames: Iterable[tuple[bytes | memoryview, str]], transform: str | None,
                   digest: str | None = None) -> None:
        """Append the next chunk as its stored frames and their checksums, each written as it
        arrives (``header_last`` writers only: the header records the stored size at the end)."""
        if not self.header_last:
            raise ValueError(f"{self.rel}: add_frames needs a writer whose header is written last")
        n = len(self.records)
        spec, start, sizes, sums = self.specs[n], self._at, [], []
        for frame, crc in frames:
            with self.timings.phase("upload"):
                write_all(self._f, memoryview(frame))
            sizes.append(len(frame))
            sums.append(crc)
            self._at += len(frame)
            self._writeback()
        c = codec.Codec(codec.ZSTD, transform, self.block_bytes, tuple(sizes))
        if c.stored > spec.nbytes:
            raise ValueError(f"{spec.key} chunk {spec.box}: {c.stored} encoded bytes for {spec.nbytes}")
        self.specs[n] = ChunkSpec(spec.key, spec.box, spec.dtype, c.stored)
        self.records.append(Chunk(spec.box, self.rel, start, spec.nbytes, tuple(sums), c, digest))

    def _writeback(self) -> None:
        if self._at - self._unflushed >= _WRITEBACK_BYTES:
            self.storage.start_writeback(self._f, self._unflushed, self._at)
            self._unflushed = self._at

    def add(self, data: torch.Tensor, digest: str | None = None) -> None:
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
        self.records.append(Chunk(spec.box, self.rel, self._at, len(buf), sums, digest=digest))
        self._at += len(buf)
        self._writeback()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and len(self.records) != len(self.specs):
            exc = ValueError(f"{self.rel}: {len(self.records)} of {len(self.specs)} chunks written")
            self._ctx.__exit__(ValueError, exc, None)
            raise exc
        with self.timings.phase("upload"):  # closing makes it durable: fsync, or the last part's PUT
            if exc_type is None and self.header_last:
                try:
                    self._f.seek(0)
                    write_all(self._f, memoryview(object_header(self.specs, self.save_id, len(self.header))))
                except BaseException as e:
                    if not self._ctx.__exit__(type(e), e, e.__traceback__):
                        raise
                    return
            self._ctx.__exit__(exc_type, exc, tb)


def _seekable(f) -> bool:
    """Whether ``f`` (from ``open_write``) can go back and overwrite its start (local files)."""
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


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


@dataclass(frozen=True)
class Encoding:
    """How a rank stores its chunks beyond raw bytes; JSON in the job's head (``"encoding"``),
    so the daemon gets it too.

    level: zstd level of compressed chunks (None: no compression); byte_group: byte planes
    before zstd; dtypes: names of the dtypes compressed; digests: compute each chunk's
    content digest; base: an earlier checkpoint of the same run root whose identical
    chunks are referenced instead of written (needs digests).
    """

    level: int | None = None
    byte_group: bool = True
    dtypes: frozenset[str] = field(default_factory=frozenset)
    digests: bool = False
    base: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "byte_group": self.byte_group, "dtypes": sorted(self.dtypes),
                "digests": self.digests, "base": self.base}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Encoding:
        if not d:
            return cls()
        return cls(d.get("level"), bool(d.get("byte_group", True)), frozenset(d.get("dtypes") or ()),
                   bool(d.get("digests")), d.get("base"))

    def compresses(self, spec: ChunkSpec) -> bool:
        """Chunks under 4 KiB stay raw: a zstd frame's header and tables cost what they could save."""
        return self.level is not None and spec.nbytes >= MIN_COMPRESSED_BYTES and dtype_name(spec.dtype) in self.dtypes


def digest_chunks(chunks: list[StagedChunk]) -> list[str]:
    """Content digests of the chunks' raw bytes, on the codec threads."""
    return list(codec.pool().map(lambda c: codec.digest(as_bytes(c.data)), chunks))


def _encode_frame(raw: memoryview, itemsize: int, level: int, group: bool) -> tuple[bytes | memoryview, str]:
    """One frame's stored bytes and their checksum (on a codec thread)."""
    frame = codec.encode_frame(raw, itemsize, level, group)
    return frame, checksum(memoryview(frame))


def submit_frames(buf: memoryview, itemsize: int, block_bytes: int, enc: Encoding) -> list[futures.Future]:
    """Compress one chunk's frames (``block_bytes`` of ``buf`` each) on the codec threads; each
    future gives the frame's stored bytes (possibly a view of ``buf``) and their checksum."""
    group = codec.transform_for(itemsize, enc.byte_group) is not None
    return [
        codec.pool().submit(_encode_frame, buf[at : at + block_bytes], itemsize, enc.level, group)
        for at in range(0, len(buf), block_bytes)
    ]


def _submit_frames(chunks: list[StagedChunk], selected: list[int], block_bytes: int,
                   enc: Encoding) -> dict[int, list[futures.Future]]:
    """Compress the frames of each selected chunk on the codec threads, in the order given."""
    return {i: submit_frames(as_bytes(chunks[i].data), chunks[i].spec.dtype.itemsize, block_bytes, enc)
            for i in selected}


def frame_results(fs: list[futures.Future], timings: Timings) -> Iterator[tuple[bytes | memoryview, str]]:
    """The frames of :func:`submit_frames` in order, as each is ready."""
    for f in fs:
        with timings.phase("serialize"):  # the compression the writes did not hide
            r = f.result()
        yield r


def write_chunks(
    storage: Storage,
    rel: str,
    chunks: list[StagedChunk],
    digests: list[str | None],
    save_id: str,
    block_bytes: int,
    enc: Encoding,
    timings: Timings,
) -> tuple[list[ChunkSpec], list[Chunk]]:
    """One data object: raw chunks widest dtype first, then encoded ones (U8 entries).

    Frames are compressed on the codec threads while this one writes: where the object's header
    can be written last (local files) each frame goes out as soon as it is compressed, so the
    disk and the compressors work at once; elsewhere the header names every stored size, so all
    are compressed first, and a chunk that shrinks by less than 1/64 is stored raw."""
    selected = [i for i, c in enumerate(chunks) if enc.level is not None and enc.compresses(c.spec)]
    raw = frame_order([i for i in range(len(chunks)) if i not in set(selected)], lambda i: chunks[i].spec.dtype)
    bound = [chunks[i].spec for i in raw] + [
        ChunkSpec(chunks[i].spec.key, chunks[i].spec.box, chunks[i].spec.dtype, chunks[i].spec.nbytes)
        for i in selected
    ]
    if not selected:
        with ObjectWriter(storage, rel, bound, save_id, block_bytes, timings) as w:
            for i in raw:
                w.add(chunks[i].data, digests[i])
        return w.specs, w.records
    jobs = _submit_frames(chunks, selected, block_bytes, enc)
    try:
        with ObjectWriter(storage, rel, bound, save_id, block_bytes, timings, header_last=True) as w:
            if w.header_last:
                for i in raw:
                    w.add(chunks[i].data, digests[i])
                for i in selected:
                    transform = codec.transform_for(chunks[i].spec.dtype.itemsize, enc.byte_group)
                    w.add_frames(frame_results(jobs[i], timings), transform, digests[i])
                return w.specs, w.records
            encoded = {}
            for i in selected:
                frames = list(frame_results(jobs[i], timings))
                if sum(len(f) for f, _ in frames) * 64 <= chunks[i].spec.nbytes * 63:
                    transform = codec.transform_for(chunks[i].spec.dtype.itemsize, enc.byte_group)
                    encoded[i] = codec.finish([f for f, _ in frames], block_bytes, transform, [c for _, c in frames])
            raw = frame_order([i for i in range(len(chunks)) if i not in encoded], lambda i: chunks[i].spec.dtype)
            w.declare([chunks[i].spec for i in raw] + [
                ChunkSpec(chunks[i].spec.key, chunks[i].spec.box, chunks[i].spec.dtype, encoded[i].codec.stored)
                for i in sorted(encoded)
            ])
            for i in raw:
                w.add(chunks[i].data, digests[i])
            for i in sorted(encoded):
                w.add_encoded(encoded[i], digests[i])
            return w.specs, w.records
    finally:  # a failed write leaves no compressor reading the caller's buffers
        pending = [f for fs in jobs.values() for f in fs]
        for f in pending:
            f.cancel()
        futures.wait(pending)


def write_rank(
    storage: Storage,
    save_id: str,
    rank: int,
    chunks: list[StagedChunk],
    block_bytes: int,
    extra: dict[str, Any] | None = None,
    timings: Timings | None = None,
    world: int = 1,
    before_index: Callable[[], None] | None = None,
) -> None:
    """Persist this rank's chunks, then the object's index (the chunk records of the rule
    tensors ``extra["index_keys"]`` lists), then the rank's staging index (the durability marker);
    ``before_index`` runs just before that (a worker stops its heartbeat: no beat may land after
    the committer, seeing the index, has cleaned up).

    With ``extra["encoding"]`` (:class:`Encoding`), digests come first: chunks identical
    to the base checkpoint's are referenced (declared in staging before anything relies on
    them, :func:`ckpt.refs.reuse`), and only the others are written, compressed or not.
    (A save with a base stores no tensor by rule: a referenced chunk lies in another object.)"""
    timings = timings if timings is not None else Timings()
    extra = dict(extra or {})
    enc = Encoding.from_json(extra.pop("encoding", None))
    index_keys = set(extra.pop("index_keys", ()))
    index: dict[str, Any] = {"rank": rank, "objects": {}, "chunks": {}, "bytes": 0}
    digests: list[str | None] = [None] * len(chunks)
    if enc.digests and chunks:
        with timings.phase("serialize"):
            digests = [*digest_chunks(chunks)]
    reused: dict[int, Chunk] = {}
    if enc.base and chunks:
        reused, held = refs.reuse(storage, save_id, rank, enc.base, [c.spec for c in chunks], digests)
        if held:
            index["refs"] = held
    fresh = [i for i in range(len(chunks)) if i not in reused]
    try:
        if fresh:
            rel = object_name(save_id, rank, world)
            to_write, their_digests = [chunks[i] for i in fresh], [digests[i] for i in fresh]
            specs, records = write_chunks(storage, rel, to_write, their_digests, save_id, block_bytes, enc, timings)
            add_records(index, rel, specs, records, index_keys)
            if index_keys:
                write_object_index(storage, save_id, rel, index)
        for i, rec in sorted(reused.items()):
            index["chunks"].setdefault(chunks[i].spec.key, []).append(rec.to_json())
            index["bytes"] += rec.length
        index.update(extra)
        if before_index is not None:
            before_index()
        write_rank_index(storage, save_id, rank, index, world)
    except StorageFullError:
        _give_space_back(storage, index["objects"])
        raise


def _give_space_back(storage: Storage, written: Iterable[str]) -> None:
    """A full disk failed this rank's save before its staging index (the only thing the
    committer reads) was published, so nothing can reference what it wrote: delete it, so that
    the full disk gets its space back now rather than at the next ``ckpt gc``."""
    for rel in written:
        try:
            storage.delete(rel)
        except OSError as e:
            log.warning("%s: could not delete %s of a save that failed (left for `ckpt gc`): %s", storage.uri, rel, e)


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
    head: dict[str, Any] | None  # what the rank index carries (rank 0: also what the manifest needs)
    commit_timeout_s: float
    heartbeat: Heartbeat | None = None  # the trainer's, when it persists in-process


def persist_rank(job: PersistJob, timings: Timings) -> None:
    """Write the rank's data and index; rank 0 then commits, the others wait for it.

    The rank beats (``ckpt.liveness``) until its index is written, rank 0 until the commit
    point: with the trainer's heartbeat when it runs in the trainer, with its own in a daemon
    (``head["heartbeat_s"]``), which keeps the save alive after the trainer is gone."""
    head = dict(job.head or {})
    interval = head.pop("heartbeat_s", None)
    beat = job.heartbeat or start_heartbeat(job.storage, job.save_id, job.rank, job.world_size, interval)
    stop = beat.stop if beat is not None else None
    try:
        try:
            write_rank(
                job.storage, job.save_id, job.rank, job.chunks, job.block_bytes, head, timings, job.world_size,
                before_index=stop if job.rank != 0 else None,  # durable: nothing waits on a worker any more
            )
        except BaseException as e:
            report_failure(job.storage, job.save_id, job.rank, e)
            raise
        with timings.phase("commit"):
            if job.rank == 0:
                commit(job.storage, job.save_id, job.world_size, job.commit_timeout_s, committed=stop)
            else:
                wait_committed(job.storage, job.save_id, job.rank, job.commit_timeout_s, job.world_size)
    finally:
        if stop is not None:
            stop()
