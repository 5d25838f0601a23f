"""Where a merge's output goes: a ckpt checkpoint, or HF-style safetensors.

A sink is told everything it will receive up front (:meth:`Sink.prepare`), then
gets each tensor chunk by chunk, in the order it asked for, and finally commits.
:class:`SinkThread` runs a sink on a thread of its own so that writing overlaps
the arithmetic, with a bound on the output chunks in flight.
"""

from __future__ import annotations

import json
import queue
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..errors import CheckpointExistsError
from ..framing import as_bytes, frame_order, safetensors_header, write_all
from ..options import SaveOptions
from ..regions import Box, split_into_chunks
from ..storage import open_storage
from ..values import dumps, encode_checked
from ..writer import CheckpointWriter, ChunkStream
from .sources import TensorPlan
from .stream import BufferPool

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
HF_VALUES_KEY = "ckpt_values"  # same key as ckpt.interop.hf: JSON values ride in the metadata
HF_MERGE_KEY = "ckpt_merge"


class Sink(ABC):
    """The receiving end of a merge."""

    @abstractmethod
    def prepare(self, plans: dict[str, TensorPlan], values: dict[str, Any], record: dict[str, Any]) -> list[str]:
        """Learn what will come (tensors, JSON values, the merge record); return the tensor order."""

    @abstractmethod
    def boxes(self, plan: TensorPlan) -> list[Box]:
        """How tensor ``plan.key`` arrives: row-major slabs, contiguous in its flattening."""

    @abstractmethod
    def begin(self, plan: TensorPlan) -> None: ...

    @abstractmethod
    def send(self, data: torch.Tensor) -> None:
        """The next box of the current tensor; ``data`` is reused once this returns."""

    @abstractmethod
    def end(self) -> None: ...

    @abstractmethod
    def commit(self, step: int | None) -> str:
        """Make the output visible; return where it is."""

    @abstractmethod
    def abort(self) -> None:
        """Leave nothing visible (called after a failure)."""


class CkptSink(Sink):
    """A ckpt checkpoint through :class:`ckpt.writer.CheckpointWriter` (atomic commit)."""

    def __init__(self, uri: str, options: SaveOptions | None = None, pack_bytes: int = 1 << 20) -> None:
        self.options = options or SaveOptions(chunk_bytes=16 << 20)
        self.pack_bytes = pack_bytes
        self.writer = CheckpointWriter(uri, self.options, pack_bytes=pack_bytes)
        self.uri = uri
        self._ctx: AbstractContextManager[ChunkStream] | None = None
        self._stream: ChunkStream | None = None
        self._plan: TensorPlan | None = None

    def prepare(self, plans: dict[str, TensorPlan], values: dict[str, Any], record: dict[str, Any]) -> list[str]:
        for k, v in values.items():
            self.writer.set_value(k, v)
        self.record = record
        return sorted(plans)

    def _small(self, plan: TensorPlan) -> bool:
        return plan.nbytes < self.pack_bytes

    def boxes(self, plan: TensorPlan) -> list[Box]:
        if self._small(plan):
            return [Box.full(plan.shape)]
        return split_into_chunks(Box.full(plan.shape), plan.out_dtype.itemsize, self.options.chunk_bytes)

    def begin(self, plan: TensorPlan) -> None:
        self._plan = plan
        if not self._small(plan):
            self._ctx = self.writer.tensor_stream(plan.key, plan.shape, plan.out_dtype)
            self._stream = self._ctx.__enter__()
            if self._stream.boxes != self.boxes(plan):
                raise AssertionError(f"{plan.key}: the writer cuts the tensor differently than planned")

    def send(self, data: torch.Tensor) -> None:
        assert self._plan is not None
        if self._stream is None:  # packed with others, written later: keep a copy, the buffer is reused
            self.writer.write_tensor(self._plan.key, data.clone())
        else:
            self._stream.send(data)

    def end(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx, self._stream = self._ctx, None, None
            ctx.__exit__(None, None, None)
        self._plan = None

    def commit(self, step: int | None) -> str:
        self.writer.commit(step=step, metadata={"merge": self.record})
        return self.uri

    def abort(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx, self._stream = self._ctx, None, None
            try:
                ctx.__exit__(RuntimeError, RuntimeError("merge aborted"), None)
            except RuntimeError:
                pass


class HFSink(Sink):
    """Hugging Face safetensors: ``model.safetensors``, or numbered shards of at most
    ``max_shard_bytes`` and ``model.safetensors.index.json``.

    Shards are filled greedily in key order; inside a file the widest dtypes come
    first so that every tensor is aligned to its item size. JSON values are kept as
    JSON under the ``ckpt_values`` metadata key, the merge record under ``ckpt_merge``.
    Files are written under temporary names and moved into place at commit (the
    index last), so a failed merge leaves any previous model as it was.
    """

    def __init__(
        self,
        uri: str,
        max_shard_bytes: int | None = None,
        chunk_bytes: int = 16 << 20,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if max_shard_bytes is not None and max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.storage = open_storage(uri, **(storage_options or {}))
        self.uri, self.max_shard_bytes, self.chunk_bytes = uri, max_shard_bytes, chunk_bytes
        if not overwrite and (self.storage.exists(HF_INDEX) or self.storage.exists(HF_SINGLE)):
            raise CheckpointExistsError(f"{uri}: holds a safetensors model; pass overwrite=True")
        self.files: list[str] = []
        self._token = uuid.uuid4().hex[:8]
        self._written: list[str] = []  # temporary files, in the order of self.files

    def _tmp(self, name: str) -> str:
        return f".{name}.tmp-{self._token}"

    def prepare(self, plans: dict[str, TensorPlan], values: dict[str, Any], record: dict[str, Any]) -> list[str]:
        shards: list[list[TensorPlan]] = [[]]
        size = 0
        for key in sorted(plans):
            p = plans[key]
            if self.max_shard_bytes is not None and shards[-1] and size + p.nbytes > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(p)
            size += p.nbytes
        self.shards = [frame_order(s, lambda p: p.out_dtype) for s in shards]
        n = len(self.shards)
        self.files = [HF_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        meta = {"format": "pt", HF_MERGE_KEY: json.dumps(record, separators=(",", ":"))}
        if n == 1 and values:
            meta[HF_VALUES_KEY] = dumps({k: encode_checked(v, k) for k, v in values.items()})
        self.values, self.record, self.meta, self.total = values, record, meta, sum(p.nbytes for p in plans.values())
        self._first = {s[0].key: i for i, s in enumerate(self.shards) if s}
        self._last = {s[-1].key: i for i, s in enumerate(self.shards) if s}
        self._ctx: AbstractContextManager | None = None
        self._f = None
        return [p.key for s in self.shards for p in s]

    def boxes(self, plan: TensorPlan) -> list[Box]:
        return split_into_chunks(Box.full(plan.shape), plan.out_dtype.itemsize, self.chunk_bytes)

    def begin(self, plan: TensorPlan) -> None:
        i = self._first.get(plan.key)
        if i is not None:
            rel = self._tmp(self.files[i])
            self._written.append(rel)
            self._ctx = self.storage.open_write(rel)
            self._f = self._ctx.__enter__()
            header = safetensors_header(((p.key, p.out_dtype, p.shape) for p in self.shards[i]), self.meta)
            write_all(self._f, memoryview(header))
        self._key = plan.key

    def send(self, data: torch.Tensor) -> None:
        if data.numel():
            write_all(self._f, as_bytes(data.contiguous()))

    def end(self) -> None:
        if self._key in self._last and self._ctx is not None:
            ctx, self._ctx, self._f = self._ctx, None, None
            ctx.__exit__(None, None, None)

    def _move_in(self) -> None:
        for tmp, name in zip(self._written, self.files):
            self.storage.fs.mv(self.storage.path(tmp), self.storage.path(name))
        self._written = []

    def commit(self, step: int | None) -> str:
        if len(self._written) != len(self.files):
            raise AssertionError(f"{len(self._written)} of {len(self.files)} safetensors files written")
        if len(self.files) == 1:
            self._move_in()  # replaces a previous model.safetensors in one step
            self.storage.delete(HF_INDEX)  # a stale index must not describe other files
        else:
            self.storage.delete(HF_INDEX)  # the previous sharded model stops being one before its shards change
            self._move_in()
            self.storage.delete(HF_SINGLE)
            index = {
                "metadata": {"total_size": self.total, HF_MERGE_KEY: self.record},
                "weight_map": dict(sorted((p.key, name) for name, s in zip(self.files, self.shards) for p in s)),
            }
            if self.values:
                index["metadata"][HF_VALUES_KEY] = {k: encode_checked(v, k) for k, v in self.values.items()}
            self.storage.put_atomic(HF_INDEX, dumps(index, indent=2).encode())
        for name in self.storage.listdir(""):
            if name.startswith("model-") and name.endswith(".safetensors") and name not in self.files:
                self.storage.delete(name)  # shards of a model this one replaced
        return self.uri

    def abort(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx, self._f = self._ctx, None, None
            try:
                ctx.__exit__(RuntimeError, RuntimeError("merge aborted"), None)
            except RuntimeError:
                pass
        for tmp in self._written:
            self.storage.delete(tmp)
        self._written = []


class SinkThread:
    """Run a sink's calls on a writer thread, in order, with at most ``slots`` output
    chunks alive (being built, queued or written), their buffers recycled. The first
    error is raised in the caller at its next call."""

    def __init__(self, sink: Sink, slots: int, chunk_bytes: int) -> None:
        self.sink = sink
        self._q: queue.Queue = queue.Queue()
        self._sem = threading.Semaphore(slots)
        self._pool = BufferPool(chunk_bytes)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ckpt-merge-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, args, chunk = item
            try:
                if self._error is None:
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e
            finally:
                if chunk is not None:
                    self._pool.give(chunk)
                    self._sem.release()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def alloc(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An output chunk buffer; waits while ``slots`` chunks are in flight."""
        while not self._sem.acquire(timeout=0.1):
            self._check()
        self._check()
        return self._pool.take(numel, dtype)

    def call(self, fn: Callable, *args: Any) -> None:
        self._check()
        self._q.put((fn, args, None))

    def send(self, data: torch.Tensor) -> None:
        """Queue one chunk (allocated by :meth:`alloc`)."""
        self._check()
        self._q.put((self.sink.send, (data,), data))

    def close(self) -> None:
        """Wait for everything queued; raise the first error."""
        self._q.put(None)
        self._thread.join()
        self._check()
