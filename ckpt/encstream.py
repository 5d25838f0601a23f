"""One compressed data object written chunk by chunk as a producer sends them (the offline writer's streams).

``ckpt.save`` has every chunk of an object staged before it writes (``engine.write_chunks``);
:class:`ckpt.writer.CheckpointWriter` streams a large tensor, or a tool's caller-chosen chunks,
one chunk at a time. This compresses them with the same code (``engine.submit_frames``, frames
on the codec threads) into the same stored form (docs/FORMAT.md, "Compressed chunks").
"""

from __future__ import annotations

from concurrent import futures

import torch

from . import codec
from .engine import Encoding, ObjectWriter, Timings, frame_results, submit_frames
from .format import Chunk
from .framing import ChunkSpec, as_bytes, frame_order
from .storage import Storage


def stream_encodes(enc: Encoding, specs: list[ChunkSpec]) -> list[bool]:
    """Which chunks of an object written in send order are encoded: those ``enc`` compresses and,
    after the first of them, every other non-empty chunk of item size > 1: a raw chunk behind
    encoded bytes could not start at a multiple of its item size (reader rule 6). Their frames
    that do not shrink are stored raw, so this costs a compression attempt, not space."""
    out, seen = [], False
    for s in specs:
        seen = seen or enc.compresses(s)
        out.append(enc.compresses(s) or (seen and s.nbytes > 0 and s.dtype.itemsize > 1))
    return out


class EncodedObjectStream:
    """A data object whose chunks arrive one by one (:meth:`add`, in ``specs`` order), compressed
    as ``enc`` says; after the ``with`` block, ``specs`` and ``records`` say what was written, in
    object order.

    Local files (the header can be written last): the header is reserved, each chunk's frames
    are compressed on the codec threads and written as they come (memory: the chunk being sent);
    empty chunks are listed first, so that every raw chunk starts aligned (:func:`stream_encodes`).
    Object stores stream bytes in order and the header lists every stored size, so each chunk is
    compressed as it arrives and held until the last (memory: the object's stored bytes, at most
    its raw size); then, as ``ckpt.save`` does, raw chunks go first, widest dtype first, and a
    chunk that shrinks by less than 1/64 is stored raw.
    """

    def __init__(self, storage: Storage, rel: str, specs: list[ChunkSpec], save_id: str, block_bytes: int,
                 enc: Encoding) -> None:
        self.rel, self.block_bytes, self.enc = rel, block_bytes, enc
        self._sent_specs = list(specs)
        self._encodes = stream_encodes(enc, specs)
        self._empty = [i for i, s in enumerate(specs) if s.nbytes == 0]
        order = self._empty + [i for i, s in enumerate(specs) if s.nbytes > 0]
        bound = [ChunkSpec(specs[i].key, specs[i].box, specs[i].dtype, specs[i].nbytes) if self._encodes[i]
                 else specs[i] for i in order]
        self._timings = Timings()
        self._w = ObjectWriter(storage, rel, bound, save_id, block_bytes, self._timings, header_last=True)
        self._sent = 0
        self._held: list[tuple[int, torch.Tensor | codec.Encoded]] = []  # object stores: (sent index, chunk)
        self.specs: list[ChunkSpec] = []
        self.records: list[Chunk] = []

    def __enter__(self) -> EncodedObjectStream:
        self._w.__enter__()
        if self._w.header_last:
            for _ in self._empty:
                self._w.add(torch.empty(0, dtype=torch.uint8))
        return self

    def add(self, data: torch.Tensor) -> None:
        """Write (or, on an object store, hold) the next chunk: its raw bytes, a contiguous uint8
        CPU tensor the caller may reuse once this returns."""
        if self._sent == len(self._sent_specs):
            raise ValueError(f"{self.rel}: more chunks than declared")
        i, spec = self._sent, self._sent_specs[self._sent]
        buf = as_bytes(data) if data.numel() else memoryview(b"")
        if len(buf) != spec.nbytes:
            raise ValueError(f"{spec.key} chunk {spec.box}: got {len(buf)} bytes, expected {spec.nbytes}")
        self._sent += 1
        if self._w.header_last:
            if spec.nbytes == 0:
                return  # written on entry
            if not self._encodes[i]:
                self._w.add(data)
                return
            self._write_frames(buf, spec)
        elif self.enc.compresses(spec):
            frames = self._compress(buf, spec)
            if sum(len(f) for f, _ in frames) * 64 <= spec.nbytes * 63:
                transform = codec.transform_for(spec.dtype.itemsize, self.enc.byte_group)
                stored = [f if isinstance(f, bytes) else bytes(f) for f, _ in frames]  # raw frames view ``data``
                self._held.append((i, codec.finish(stored, self.block_bytes, transform, [c for _, c in frames])))
            else:
                self._held.append((i, data.clone()))
        else:
            self._held.append((i, data.clone()))

    def _compress(self, buf: memoryview, spec: ChunkSpec) -> list[tuple[bytes | memoryview, str]]:
        jobs = submit_frames(buf, spec.dtype.itemsize, self.block_bytes, self.enc)
        try:
            return list(frame_results(jobs, self._timings))
        finally:  # a failure leaves no compressor reading the caller's buffer
            _settle(jobs)

    def _write_frames(self, buf: memoryview, spec: ChunkSpec) -> None:
        jobs = submit_frames(buf, spec.dtype.itemsize, self.block_bytes, self.enc)
        try:
            self._w.add_frames(frame_results(jobs, self._timings), codec.transform_for(spec.dtype.itemsize,
                                                                                        self.enc.byte_group))
        finally:
            _settle(jobs)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._sent != len(self._sent_specs):
            exc = ValueError(f"{self.rel}: {self._sent} of {len(self._sent_specs)} chunks written")
            self._w.__exit__(ValueError, exc, None)
            raise exc
        if exc_type is None and not self._w.header_last:
            try:
                self._write_held()
            except BaseException as e:
                self._w.__exit__(type(e), e, e.__traceback__)
                raise
        self._w.__exit__(exc_type, exc, tb)
        self.specs, self.records = self._w.specs, self._w.records

    def _write_held(self) -> None:
        specs = self._sent_specs
        raw = frame_order([(i, c) for i, c in self._held if isinstance(c, torch.Tensor)], lambda h: specs[h[0]].dtype)
        encoded = [(i, c) for i, c in self._held if isinstance(c, codec.Encoded)]
        self._w.declare([specs[i] for i, _ in raw] + [
            ChunkSpec(specs[i].key, specs[i].box, specs[i].dtype, c.codec.stored) for i, c in encoded
        ])
        for _, data in raw:
            self._w.add(data)
        for _, enc in encoded:
            self._w.add_encoded(enc)
        self._held = []


def _settle(jobs: list[futures.Future]) -> None:
    for f in jobs:
        f.cancel()
    futures.wait(jobs)
