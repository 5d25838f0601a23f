"""``ckpt.merge``: open the sources, weigh them, stream the weighted sum into the output."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._version import __version__
from ..options import Compression, LoadOptions, SaveOptions
from .combine import flat_start
from .errors import MergeError, WeightError
from .lcsc import SearchMethod
from .methods import Method, check_weights, make_method
from .sinks import CkptSink, HFSink, Sink, SinkThread
from .sources import (
    MergeSource,
    TensorPlan,
    open_sources,
    parse_dtype,
    pick_base,
    plan_tensors,
    series_order,
    summation_order,
)
from .stream import BufferPool, Request, compute, make_jobs, read_flat

FORMATS = ("ckpt", "hf")


@dataclass
class MergeResult:
    """What a merge wrote and how it weighed its sources."""

    uri: str
    output_format: str
    weights: dict[str, float]  # source URI -> weight, in the order the sources were given
    record: dict[str, Any]  # as written to the output's metadata ("merge")
    seconds: float
    files: list[str] = field(default_factory=list)


def merge(
    sources: Sequence[str],
    output: str,
    method: str | Method = "uniform",
    *,
    output_format: str = "ckpt",
    dtype: torch.dtype | str | None = None,
    base: int | str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    overwrite: bool = False,
    chunk_bytes: int = 16 << 20,
    compression: Compression | None = None,
    max_shard_bytes: int | None = None,
    storage_options: dict[str, Any] | None = None,
    load_options: LoadOptions | None = None,
    work_bytes: int = 8 << 20,
    prefetch_bytes: int = 32 << 20,
    io_threads: int = 2,
    progress: bool = False,
    **method_options: Any,
) -> MergeResult:
    """Merge checkpoints into ``output``: every floating tensor becomes ``sum_i w_i * theta_i``.

    method: ``"uniform"``, ``"explicit"`` (``weights=[...]``), ``"ema"`` (``decay=``),
      ``"mwa"`` (``metric=``, ``penalty=``, ``higher_is_better=``), ``"lcsc"``
      (``evaluate="module:function"``, ``budget=``, ``seed=``), any registered name
      (its options as keyword arguments), or a :class:`Method` instance.
    output_format: ``"ckpt"`` or ``"hf"`` (safetensors shards of at most ``max_shard_bytes``
      and ``model.safetensors.index.json``).
    dtype: output dtype of the merged tensors (default: the base source's); the sum is
      accumulated in fp32 (fp64 when a source is fp64).
    base: which source (index in ``sources`` or URI) gives the non-floating tensors and the
      JSON values; default the latest (highest step, else the last given).
    include / exclude: glob patterns on flat keys; what is not selected is left out.
    compression: compress the output's chunks as ``SaveOptions(compression=...)`` does
      (``output_format="ckpt"`` only).

    Memory stays at a few ``work_bytes`` ranges per source plus two output chunks
    (``chunk_bytes``), whatever the size of the models. See docs/MERGING.md.
    """
    t0 = time.perf_counter()
    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {FORMATS}, got {output_format!r}")
    for name, v in (("work_bytes", work_bytes), ("prefetch_bytes", prefetch_bytes), ("chunk_bytes", chunk_bytes)):
        if v <= 0:
            raise ValueError(f"{name} must be positive")
    if compression is not None and output_format != "ckpt":
        raise ValueError(f"compression: output_format={output_format!r} stores raw tensors; only 'ckpt' compresses")
    m = make_method(method, **method_options)
    srcs = open_sources(sources, load_options or LoadOptions(io_threads=1, storage_options=storage_options or {}))
    _check_output_is_new(srcs, output, storage_options or {})
    series = series_order(srcs)
    summed = summation_order(srcs)
    base_src = pick_base(srcs, base)
    plans, values = plan_tensors(srcs, base_src, include, exclude, parse_dtype(dtype))
    sink: Sink
    if output_format == "ckpt":
        opts = SaveOptions(chunk_bytes=chunk_bytes, overwrite=overwrite, storage_options=storage_options or {},
                           compression=compression)
        sink = CkptSink(output, opts)
    else:
        sink = HFSink(output, max_shard_bytes, chunk_bytes, overwrite, storage_options)
    index = {id(s): i for i, s in enumerate(summed)}
    base_idx = index[id(base_src)]
    itemsizes = _itemsizes(summed)

    def to_summed(w_series: Sequence[float]) -> list[float]:
        w = [0.0] * len(summed)
        for s, x in zip(series, w_series):
            w[index[id(s)]] = x
        return w

    search_record: dict[str, Any] | None = None
    if isinstance(m, SearchMethod):
        build = _builder(summed, plans, sink, base_idx, itemsizes, work_bytes, io_threads, prefetch_bytes, m)
        w_series, search_record = m.search([s.info for s in series], lambda c: build(to_summed(c)), progress)
        w_series = check_weights(w_series, len(series), m.name)
    else:
        w_series = check_weights(m.weights([s.info for s in series]), len(series), m.name)
    if all(x == 0.0 for x in w_series):
        raise WeightError(f"{m.name}: every weight is zero")
    weight_of = {s.uri: w for s, w in zip(series, w_series)}
    record = {
        **m.to_json(),
        "sources": [
            {
                "uri": s.uri,
                "step": s.info.step,
                "save_id": s.reader.manifest.save_id,
                "metrics": dict(s.info.metrics),
                "weight": weight_of[s.uri],
            }
            for s in srcs
        ],
        "base": base_src.uri,
        "accumulation": "float32 (float64 where a source is float64)",
        "dtype": str(parse_dtype(dtype)).removeprefix("torch.") if dtype is not None else None,
        "library_version": __version__,
    }
    if search_record is not None:
        record["search"] = search_record
    order = sink.prepare(plans, values, record)
    jobs = make_jobs(order, plans, sink.boxes, to_summed(w_series), base_idx)
    _stream(jobs, sink, summed, itemsizes, work_bytes, io_threads, prefetch_bytes, progress)
    uri = sink.commit(base_src.info.step)
    return MergeResult(
        uri=uri,
        output_format=output_format,
        weights={s.uri: weight_of[s.uri] for s in srcs},
        record=record,
        seconds=time.perf_counter() - t0,
        files=list(getattr(sink, "files", [])),
    )


def _check_output_is_new(srcs: Sequence[MergeSource], output: str, storage_options: dict[str, Any]) -> None:
    from ..storage import open_storage

    out = open_storage(output, **storage_options)
    where = (out.fs.protocol, out.root)
    for s in srcs:
        if (s.reader.storage.fs.protocol, s.reader.storage.root) == where:
            raise MergeError(f"the output {output!r} is one of the sources; write the merge elsewhere")


def _itemsizes(summed: Sequence[MergeSource]) -> Callable[[int, str], int]:
    def itemsize(src: int, key: str) -> int:
        return summed[src].reader.record(key).dtype.itemsize

    return itemsize


def _reader(summed: Sequence[MergeSource]) -> Callable[[Request, BufferPool], torch.Tensor]:
    def read(req: Request, pool: BufferPool) -> torch.Tensor:
        reader = summed[req.src].reader
        out = pool.take(req.stop - req.start, reader.record(req.key).dtype)
        return read_flat(reader, req.key, req.start, req.stop, out)

    return read


def _stream(jobs, sink: Sink, summed, itemsizes, work_bytes, io_threads, prefetch_bytes, progress) -> None:
    from tqdm.auto import tqdm

    total = sum(j.plan.nbytes for j in jobs)
    bar = tqdm(total=total, desc="merge", unit="B", unit_scale=True, disable=not progress, leave=False)
    biggest = max((b.numel * j.plan.out_dtype.itemsize for j in jobs for b in j.boxes), default=0)
    writer = SinkThread(sink, slots=2, chunk_bytes=biggest)
    try:
        for job, i, data in compute(
            jobs, _reader(summed), itemsizes, work_bytes, io_threads, prefetch_bytes, alloc=writer.alloc
        ):
            if i == 0:
                writer.call(sink.begin, job.plan)
            writer.send(data)
            bar.update(data.numel() * data.element_size())
            if i == len(job.boxes) - 1:
                writer.call(sink.end)
        writer.close()
    except BaseException:
        try:
            writer.close()
        except BaseException:
            pass
        sink.abort()
        raise
    finally:
        bar.close()


def _builder(
    summed: Sequence[MergeSource],
    plans: dict[str, TensorPlan],
    sink: Sink,
    base_idx: int,
    itemsizes: Callable[[int, str], int],
    work_bytes: int,
    io_threads: int,
    prefetch_bytes: int,
    method: Any,
) -> Callable[[Sequence[float]], dict[str, torch.Tensor]]:
    """Candidate weights (summation order) -> merged state dict in memory.

    The sources are read once and kept when they fit in the method's ``cache_bytes``;
    otherwise every candidate streams them. Either way the ranges and the
    arithmetic are the streaming merge's, so the winner is written bit for bit.
    """
    order = sorted(plans)
    needed = [(i, k) for k in order for i in (range(len(summed)) if plans[k].merged else [base_idx])]
    size = sum(math.prod(plans[k].shape) * itemsizes(i, k) for i, k in needed)
    cache: dict[tuple[int, str], torch.Tensor] | None = None
    if size <= getattr(method, "cache_bytes", 0):
        cache = {(i, k): read_flat(summed[i].reader, k, 0, math.prod(plans[k].shape)) for i, k in needed}

    def read_cached(req: Request, pool: BufferPool) -> torch.Tensor:
        assert cache is not None
        return cache[(req.src, req.key)][req.start : req.stop]

    def build(weights: Sequence[float]) -> dict[str, torch.Tensor]:
        jobs = make_jobs(order, plans, sink.boxes, weights, base_idx)
        full = {j.plan.key: torch.empty(math.prod(j.plan.shape), dtype=j.plan.out_dtype) for j in jobs}
        views = iter(
            [
                full[j.plan.key][flat_start(b, j.plan.shape) : flat_start(b, j.plan.shape) + b.numel]
                for j in jobs
                for b in j.boxes
            ]
        )
        read = read_cached if cache is not None else _reader(summed)
        threads = 0 if cache is not None else io_threads
        for _ in compute(jobs, read, itemsizes, work_bytes, threads, prefetch_bytes, alloc=lambda n, dt: next(views)):
            pass
        return {k: v.view(plans[k].shape) for k, v in full.items()}

    return build
