"""Staging: snapshot the chunks a rank writes into a reusable host buffer.

The training loop stalls only for this copy. The buffer is allocated once per
save plan and reused (DCP's async_save allocates fresh memory on every save,
~7x slower here), pinned when the source lives on a GPU so the device-to-host
copy runs on a side stream, and optionally backed by a file in /dev/shm so the
node-local daemon can persist it without another copy.
"""

from __future__ import annotations

import multiprocessing.util
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .describe import TensorEntry, local_view
from .engine import StagedChunk
from .framing import ChunkSpec
from .plan import WriteItem

ALIGN = 64  # every chunk starts on a cache line in the buffer


@dataclass
class _Route:
    spec: ChunkSpec
    piece: int  # index of the local piece holding the chunk
    src_index: tuple[slice, ...] | None  # the chunk inside that piece (filled on first use)
    dst: torch.Tensor  # uint8 view of the slot
    typed: torch.Tensor | None  # the same bytes as the chunk's dtype and shape


@dataclass(frozen=True)
class Slot:
    """A chunk's place in the staging buffer (the data object's order, cache-line aligned)."""

    spec: ChunkSpec
    offset: int  # in the buffer


def place_chunks(tensors: dict[str, TensorEntry], items: list[WriteItem]) -> tuple[list[Slot], int]:
    """Where each chunk goes in the buffer: widest dtype first, as in the data object."""
    specs = [ChunkSpec(i.key, i.chunk, tensors[i.key].dtype) for i in items]
    specs.sort(key=lambda s: -s.dtype.itemsize)
    slots, at = [], 0
    for s in specs:
        slots.append(Slot(s, at))
        at += -(-s.nbytes // ALIGN) * ALIGN
    return slots, at


KEEP_BUFFERS = 2  # staging buffers kept per process: e.g. a full state and a model-only one


class BufferCache:
    """The staging buffers of the plans this process saved most recently: one per plan (and
    persister), allocated on its first save and reused by every later one.

    A buffer is as large as the rank's state: keeping one per structure ever saved would grow
    without bound (a job saving many distinct subsets), so beyond ``keep`` the least recently
    used are freed; one still being persisted is freed by a later save that finds it idle."""

    def __init__(self, keep: int = KEEP_BUFFERS) -> None:
        self._cached: OrderedDict[Hashable, _CachedBuffer] = OrderedDict()  # least recently used first
        self.keep = max(1, keep)  # the buffer being handed out is never freed

    def get(
        self, key: Hashable, tensors: dict[str, TensorEntry], items: list[WriteItem], shm_path: str | None
    ) -> tuple[HostBuffer, list[Slot]]:
        """The buffer and slots of ``key``'s plan; a new buffer (pinned when a source tensor is on
        a GPU, a /dev/shm file at ``shm_path`` when given) on first use."""
        cached = self._cached.get(key)
        if cached is None:
            slots, nbytes = place_chunks(tensors, items)
            pinned = torch.cuda.is_available() and any(e.local.is_cuda for e in tensors.values())
            buf = HostBuffer(nbytes, pinned=pinned, shm_path=shm_path)
            # Remove a shm name at exit (a daemon that mapped it keeps the bytes). Not atexit:
            # multiprocessing children (mp.spawn trainers) skip it, leaking RAM in /dev/shm.
            closer = multiprocessing.util.Finalize(None, buf.close, exitpriority=0)
            cached = self._cached[key] = _CachedBuffer(buf, slots, closer)
        self._cached.move_to_end(key)
        self._evict()
        return cached.buf, cached.slots

    def buffers(self) -> list[HostBuffer]:
        """The buffers kept, least recently used first."""
        return [cached.buf for cached in self._cached.values()]

    def _evict(self) -> None:
        for key in list(self._cached)[: max(0, len(self._cached) - self.keep)]:
            cached = self._cached[key]
            if cached.buf.busy.acquire(blocking=False):
                del self._cached[key]
                cached.closer()  # unlinks a shm name; the memory goes with the last reference


@dataclass
class _CachedBuffer:
    buf: HostBuffer
    slots: list[Slot]
    closer: multiprocessing.util.Finalize


class HostBuffer:
    """One rank's staging memory for one plan: private, pinned, or shared (/dev/shm)."""

    def __init__(self, nbytes: int, *, pinned: bool = False, shm_path: str | None = None) -> None:
        self.nbytes = nbytes
        self.shm_path = shm_path
        self._registered = False  # page-locked by us (cudaHostRegister), to undo before unmapping
        size = max(nbytes, 1)
        if shm_path is not None:
            fd = os.open(shm_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            self.data = torch.from_file(shm_path, shared=True, size=size, dtype=torch.uint8)
            if pinned:
                _pin_in_place(self.data)
                self._registered = True
        else:
            self.data = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        # Held from the start of staging until persistence is done with the bytes.
        self.busy = threading.Lock()
        self.routes: list[_Route] | None = None  # per slot, computed on the first stage

    def route(self, slots: list[Slot], items: list[WriteItem]) -> list[_Route]:
        """Where each slot's bytes come from and go to: fixed for the plan, so worked out once
        (a reused save then pays only for the copies, not for index arithmetic per chunk)."""
        if self.routes is None:
            pieces = {(i.key, i.chunk): i.piece for i in items}
            routes = []
            for slot in slots:
                spec = slot.spec
                piece = pieces[(spec.key, spec.box)]
                dst = self.view(slot)
                typed = dst.view(spec.dtype).view(spec.box.sizes) if spec.nbytes else None
                routes.append(_Route(spec, piece, None, dst, typed))
            self.routes = routes
        return self.routes

    def view(self, slot: Slot) -> torch.Tensor:
        return self.data[slot.offset : slot.offset + slot.spec.nbytes]

    def close(self) -> None:
        """Give up the name of a shared buffer (its bytes live on while mapped) and its page lock."""
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self._registered = False
        if self.shm_path is not None:
            try:
                os.unlink(self.shm_path)
            except FileNotFoundError:
                pass


def _pin_in_place(t: torch.Tensor) -> None:
    """Page-lock memory we did not allocate through CUDA (a /dev/shm mapping)."""
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
    if err != 0:
        raise RuntimeError(f"cudaHostRegister failed with error {err}")


def stage(
    tensors: dict[str, TensorEntry],
    items: list[WriteItem],
    slots: list[Slot],
    buf: HostBuffer,
    after: torch.cuda.Stream | None = None,
) -> list[StagedChunk]:
    """Copy each chunk into its slot; return the staged chunks (views of ``buf``).

    Device tensors are copied on a side stream with non-blocking copies into
    pinned memory, after the work queued on ``after`` (the caller's stream when
    the save was called: a lazy snapshot stages from another thread, whose
    current stream is not the trainer's); the call returns once every copy has landed.
    """
    routes = buf.route(slots, items)
    stream = None
    if any(e.local.is_cuda for e in tensors.values()):
        stream = torch.cuda.Stream()
        stream.wait_stream(after if after is not None else torch.cuda.current_stream())
    staged = []
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        for r in routes:
            spec = r.spec
            entry = tensors[spec.key]
            piece = entry.pieces[r.piece]
            if r.src_index is None:
                r.src_index = spec.box.relative_to(piece.box).slices()
            if r.typed is not None:
                r.typed.copy_(local_view(entry.local.detach(), piece)[r.src_index], non_blocking=stream is not None)
            staged.append(StagedChunk(spec, r.dst))
    if stream is not None:
        stream.synchronize()
    return staged
