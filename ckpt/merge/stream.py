"""Streaming weighted sums: output chunk by output chunk, range by range, source by source.

For each output tensor the sink says how it cuts it into chunks; each chunk is
computed in flat ranges of at most ``work_bytes``: the range is read from every
contributing source (whatever its chunking or the topology it was saved from:
the reader serves any region), accumulated, cast to the output dtype. Reads run
ahead of the arithmetic in a few threads, bounded by ``prefetch_bytes``, so
peak memory is a handful of ranges plus the output chunks in flight, never a
model.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..describe import Piece, TensorEntry
from ..load import read_tensors
from ..reader import CheckpointReader
from ..regions import Box, flat_range_to_boxes
from .combine import Accumulator, flat_ranges
from .sources import TensorPlan


def read_flat(
    reader: CheckpointReader, key: str, start: int, stop: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Elements [start, stop) of the row-major flattening of ``key``, in its stored dtype
    (into ``out``, 1-D of that dtype and length, when given)."""
    rec = reader.record(key)
    if out is None:
        out = torch.empty(stop - start, dtype=rec.dtype)
    if stop == start:
        return out
    boxes = [Box((), ())] if len(rec.shape) == 0 else flat_range_to_boxes(start, stop, rec.shape)
    pieces, at = [], 0
    for b in boxes:
        pieces.append(Piece(b, at))
        at += b.numel
    entry = TensorEntry(key, out, tuple(rec.shape), tuple(pieces), "")
    read_tensors(reader.storage, reader.manifest, {key: entry}, reader.options)
    return out


class BufferPool:
    """Reusable byte buffers of one capacity.

    A fresh large allocation page-faults on first touch and, freed, goes back to
    the OS or fragments the heap; recycling a few buffers keeps both the time and
    the resident memory of a long merge flat. Larger requests are not pooled.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[torch.Tensor] = []
        self._bases: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def pooled(self, nbytes: int) -> bool:
        """Whether a request of ``nbytes`` gets a pool buffer (small ones are left to malloc)."""
        return self.capacity // 4 <= nbytes <= self.capacity

    def cost(self, nbytes: int) -> int:
        """Memory a request of ``nbytes`` holds while in flight."""
        return self.capacity if self.pooled(nbytes) else nbytes

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements (uninitialised)."""
        nbytes = numel * dtype.itemsize
        if not self.pooled(nbytes):
            return torch.empty(numel, dtype=dtype)
        with self._lock:
            base = self._free.pop() if self._free else None
        if base is None:
            base = torch.empty(self.capacity, dtype=torch.uint8)
            with self._lock:
                self._bases[base.data_ptr()] = base
        return base[:nbytes].view(dtype)

    def give(self, t: torch.Tensor) -> None:
        """Return a tensor from :meth:`take` (others are ignored). Call once per take."""
        with self._lock:
            base = self._bases.get(t.untyped_storage().data_ptr())
            if base is not None:
                self._free.append(base)


@dataclass(frozen=True)
class Request:
    """Read elements [start, stop) of ``key`` from source ``src``."""

    src: int
    key: str
    start: int
    stop: int
    nbytes: int


@dataclass
class TensorJob:
    """One output tensor: its plan, output chunks, and who contributes with what weight."""

    plan: TensorPlan
    boxes: list[Box]
    contributors: list[tuple[int, float]]  # (source index, weight), in summation order


def make_jobs(
    order: Sequence[str],
    plans: dict[str, TensorPlan],
    boxes: Callable[[TensorPlan], list[Box]],
    weights: Sequence[float],
    base: int,
) -> list[TensorJob]:
    """Merged tensors take every source with a non-zero weight; the rest come from the base."""
    merged = [(i, w) for i, w in enumerate(weights) if w != 0.0]
    if not merged:
        raise ValueError("every weight is zero")
    return [TensorJob(plans[k], boxes(plans[k]), merged if plans[k].merged else [(base, 1.0)]) for k in order]


def _ranges(job: TensorJob, work_bytes: int) -> Iterator[tuple[int, int, int]]:
    itemsize = max(job.plan.acc_dtype.itemsize, job.plan.out_dtype.itemsize)
    return flat_ranges(job.boxes, job.plan.shape, max(1, work_bytes // itemsize))


def requests(jobs: Sequence[TensorJob], work_bytes: int, itemsizes: Callable[[int, str], int]) -> Iterator[Request]:
    """Every read, in the order :func:`compute` consumes them."""
    for job in jobs:
        for _, a, b in _ranges(job, work_bytes):
            for src, _ in job.contributors:
                yield Request(src, job.plan.key, a, b, (b - a) * itemsizes(src, job.plan.key))


class Prefetcher:
    """Runs ``read`` on the requests ahead of their use, in threads, within a byte budget."""

    def __init__(
        self,
        reqs: Iterator[Request],
        read: Callable[[Request, BufferPool], torch.Tensor],
        threads: int,
        max_bytes: int,
        pool: BufferPool,
    ) -> None:
        self._reqs, self._read, self._max, self.pool = reqs, read, max_bytes, pool
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="ckpt-merge-read") if threads > 0 else None
        self._window: deque[tuple[Request, Future]] = deque()
        self._bytes = 0
        self._done = False

    def _fill(self) -> None:
        while not self._done and (not self._window or self._bytes < self._max):
            req = next(self._reqs, None)
            if req is None:
                self._done = True
                return
            if self._pool is None:
                fut: Future = Future()
                fut.set_result(self._read(req, self.pool))
            else:
                fut = self._pool.submit(self._read, req, self.pool)
            self._window.append((req, fut))
            self._bytes += self.pool.cost(req.nbytes)

    def next(self) -> tuple[Request, torch.Tensor]:
        self._fill()
        req, fut = self._window.popleft()
        self._bytes -= self.pool.cost(req.nbytes)
        data = fut.result()
        self._fill()
        return req, data

    def close(self) -> None:
        for _, fut in self._window:
            fut.cancel()
        self._window.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def compute(
    jobs: Sequence[TensorJob],
    read: Callable[[Request, BufferPool], torch.Tensor],
    itemsizes: Callable[[int, str], int],
    work_bytes: int = 8 << 20,
    threads: int = 2,
    prefetch_bytes: int = 32 << 20,
    alloc: Callable[[int, torch.dtype], torch.Tensor] | None = None,
) -> Iterator[tuple[TensorJob, int, torch.Tensor]]:
    """Yield ``(job, box index, data)`` for every output chunk, in order.

    ``read(request, pool)`` returns the request's elements (in a buffer from
    ``pool`` or any tensor); ``alloc(numel, dtype)`` makes each output chunk's
    (1-D) buffer, and a sink that bounds the chunks in flight blocks in it.
    """
    alloc = alloc or (lambda n, dt: torch.empty(n, dtype=dt))
    pool = BufferPool(max((r.nbytes for r in requests(jobs, work_bytes, itemsizes)), default=0))
    scratch: dict[torch.dtype, torch.Tensor] = {}  # accumulators when the output dtype is narrower
    fetch = Prefetcher(requests(jobs, work_bytes, itemsizes), read, threads, prefetch_bytes, pool)
    try:
        for job in jobs:
            plan = job.plan
            current, out, base = -1, None, 0
            for i, a, b in _ranges(job, work_bytes):
                if i != current:
                    if out is not None:
                        yield job, current, out.view(job.boxes[current].sizes)
                    current, base = i, a
                    out = alloc(job.boxes[i].numel, plan.out_dtype)
                assert out is not None
                target = out[a - base : b - base]
                acc_buf = None
                if plan.merged and plan.out_dtype != plan.acc_dtype:
                    acc_buf = scratch.get(plan.acc_dtype)
                    if acc_buf is None or acc_buf.numel() < b - a:
                        acc_buf = scratch[plan.acc_dtype] = torch.empty(b - a, dtype=plan.acc_dtype)
                    acc_buf = acc_buf[: b - a]
                acc = Accumulator(target, plan.acc_dtype, acc_buf)
                for src, w in job.contributors:
                    req, data = fetch.next()
                    assert (req.src, req.key, req.start) == (src, plan.key, a), "read schedule out of step"
                    acc.add(data, w)
                    if data is not acc.ref:
                        pool.give(data)
                acc.finish()
                assert acc.ref is not None
                pool.give(acc.ref)
            if out is not None:
                yield job, current, out.view(job.boxes[current].sizes)
    finally:
        fetch.close()
