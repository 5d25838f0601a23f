"""Writing a checkpoint from one process, streaming, in bounded memory.

Conversions, merges and offline resharding produce checkpoints tensor by
tensor. Small tensors are packed into shared objects; a large tensor is
streamed chunk by chunk into an object of its own, so nothing needs the whole
model in memory. The commit is the same storage protocol as ``ckpt.save``, and
``SaveOptions.compression`` the same stored form (``ckpt.engine``, ``ckpt.encstream``).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from ._version import __version__
from .commit import add_records, commit, write_rank_index
from .describe import check_json_value
from .encstream import EncodedObjectStream
from .engine import Encoding, ObjectWriter, StagedChunk, Timings, write_chunks
from .errors import CheckpointExistsError
from .format import DATA_DIR, MANIFEST, Manifest, dtype_from_name, dtype_name
from .framing import ChunkSpec
from .options import SaveOptions
from .regions import Box, split_into_chunks
from .storage import open_storage
from .values import encode_checked


class CheckpointWriter:
    """Build a checkpoint tensor by tensor; nothing is visible until :meth:`commit`.

    Use as a context manager: leaving the block by an exception commits nothing.

    Memory: the pending small tensors (``pack_bytes``) and one chunk of a streamed one. With
    ``SaveOptions(compression=...)`` chunks are stored as ``ckpt.save`` stores them; on an object
    store (which cannot write an object's header last, and the header lists every stored size)
    a streamed object's chunks are held, compressed, until its last one: for a streamed tensor
    at most the tensor's size, for :meth:`object_stream` the chunks given. Incremental saves
    (``incremental`` / ``incremental_from``) are refused.
    """

    def __init__(self, uri: str, options: SaveOptions | None = None, pack_bytes: int = 64 << 20) -> None:
        self.options = options or SaveOptions()
        if self.options.incremental:
            raise ValueError("CheckpointWriter does not write incremental checkpoints: SaveOptions.incremental / "
                             "incremental_from are options of ckpt.save / ckpt.async_save")
        self._enc = Encoding.from_json(self.options.encoding())
        self.storage = open_storage(uri, **self.options.storage_options)
        if self.storage.exists(MANIFEST) and not self.options.overwrite:
            raise CheckpointExistsError(f"{uri}: a committed checkpoint exists; pass SaveOptions(overwrite=True)")
        self.save_id = f"{secrets.token_hex(4)}-offline"
        self.pack_bytes = pack_bytes
        self._tensors: dict[str, dict[str, Any]] = {}
        self._values: dict[str, Any] = {}
        self._index: dict[str, Any] = {"rank": 0, "objects": {}, "chunks": {}}
        self._pending: list[tuple[ChunkSpec, torch.Tensor]] = []
        self._pending_bytes = 0
        self._objects = 0

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc) -> None:
        pass  # uncommitted objects stay invisible; `ckpt gc` removes them

    def _declare(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, layout: str) -> None:
        if key in self._tensors or key in self._values:
            raise ValueError(f"{key}: written twice")
        self._tensors[key] = {"shape": list(shape), "dtype": dtype_name(dtype, key), "layout": layout}

    def _next_object(self) -> str:
        self._objects += 1
        return f"{DATA_DIR}/{self.save_id}-{self._objects:05d}.safetensors"

    def write_tensor(self, key: str, tensor: torch.Tensor, layout: str = "") -> None:
        """Add a whole tensor (any device; copied to host chunk by chunk)."""
        t = tensor.detach()
        self._declare(key, tuple(t.shape), t.dtype, layout)
        chunks = split_into_chunks(Box.full(t.shape), t.dtype.itemsize, self.options.chunk_bytes)
        if t.numel() * t.dtype.itemsize >= self.pack_bytes:
            with self._object([ChunkSpec(key, b, t.dtype) for b in chunks]) as w:
                for b in chunks:
                    w.add(_host_bytes(t[b.slices()]))
            return
        for b in chunks:
            self._pending.append((ChunkSpec(key, b, t.dtype), _host_bytes(t[b.slices()])))
            self._pending_bytes += b.numel * t.dtype.itemsize
        if self._pending_bytes >= self.pack_bytes:
            self._flush()

    @contextmanager
    def tensor_stream(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype, layout: str = ""
    ) -> Iterator[ChunkStream]:
        """Stream a large tensor into its own object: for each box in ``stream.boxes``,
        in order, call ``stream.send(data)``. Memory: one chunk at a time."""
        self._declare(key, tuple(shape), dtype, layout)
        boxes = split_into_chunks(Box.full(shape), dtype.itemsize, self.options.chunk_bytes)
        with self._object([ChunkSpec(key, b, dtype) for b in boxes]) as w:
            yield ChunkStream(boxes, w)

    def declare(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, layout: str = "") -> None:
        """Declare a tensor whose chunks the caller places itself with :meth:`object_stream`."""
        self._declare(key, tuple(shape), dtype, layout)

    @contextmanager
    def object_stream(self, chunks: list[tuple[str, Box]]) -> Iterator[ChunkStream]:
        """Stream caller-chosen chunks of declared tensors into one new object, in order.

        For layouts a tool chooses (e.g. one object per rank of a target topology);
        across all calls the chunks of each declared tensor must cover it exactly once
        (the commit refuses a tensor with elements missing)."""
        specs = [ChunkSpec(key, box, dtype_from_name(self._tensors[key]["dtype"])) for key, box in chunks]
        with self._object(specs) as w:
            yield ChunkStream([b for _, b in chunks], w)

    def set_value(self, key: str, value: Any) -> None:
        check_json_value(key, value)
        if key in self._tensors:
            raise ValueError(f"{key}: written twice")
        self._values[key] = value

    @contextmanager
    def _object(self, specs: list[ChunkSpec]) -> Iterator[ObjectWriter | EncodedObjectStream]:
        """A new data object taking ``specs``' chunks in order (``add``), raw or as the options
        compress them; entered into the index once complete."""
        rel = self._next_object()
        w: AbstractContextManager[ObjectWriter | EncodedObjectStream]
        if any(self._enc.compresses(s) for s in specs):
            w = EncodedObjectStream(self.storage, rel, specs, self.save_id, self.options.block_bytes, self._enc)
        else:
            w = ObjectWriter(self.storage, rel, specs, self.save_id, self.options.block_bytes)
        with w as sink:
            yield sink
        add_records(self._index, rel, sink.specs, sink.records)

    def _flush(self) -> None:
        if self._pending:
            rel = self._next_object()
            chunks = [StagedChunk(s, d) for s, d in self._pending]  # write_chunks orders them
            specs, records = write_chunks(self.storage, rel, chunks, [None] * len(chunks), self.save_id,
                                          self.options.block_bytes, self._enc, Timings())
            add_records(self._index, rel, specs, records)
        self._pending, self._pending_bytes = [], 0

    def commit(
        self,
        step: int | None = None,
        metrics: dict[str, float] | None = None,
        metadata: dict[str, Any] | None = None,
        topology: dict[str, Any] | None = None,
        structure: Any = None,
    ) -> Manifest:
        """Make the checkpoint visible (atomically). ``structure``: the nesting to record
        (ckpt.structure; a source checkpoint's when the keys are the same), else none."""
        self._flush()
        self._index.update(
            tensors=self._tensors,
            values={k: encode_checked(v, k) for k, v in self._values.items()},  # typed JSON, as ckpt.save's
            block_bytes=self.options.block_bytes,
            step=step,
            metrics=encode_checked(dict(metrics or {}), "metrics"),
            metadata=encode_checked(dict(metadata or {}), "metadata"),
            structure=structure,
            topology=dict(topology or {"world_size": 1, "writer": "offline"}),
            library_version=__version__,
        )
        self._index["overwrite"] = self.options.overwrite
        write_rank_index(self.storage, self.save_id, 0, self._index)
        return commit(self.storage, self.save_id, 1, self.options.commit_timeout_s)


class ChunkStream:
    """The caller's side of :meth:`CheckpointWriter.tensor_stream`."""

    def __init__(self, boxes: list[Box], writer: ObjectWriter | EncodedObjectStream) -> None:
        self.boxes = boxes
        self._writer = writer
        self._sent = 0

    def send(self, data: torch.Tensor) -> None:
        """Write the next box's data (any device; its shape must be the box's)."""
        i = self._sent
        if i == len(self.boxes):
            raise ValueError("more chunks sent than the tensor has")
        if tuple(data.shape) != self.boxes[i].sizes:
            raise ValueError(f"chunk {self.boxes[i]}: got shape {tuple(data.shape)}")
        self._writer.add(_host_bytes(data))
        self._sent += 1


def _host_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
