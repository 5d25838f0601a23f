"""torch.distributed.checkpoint storage that writes and reads ckpt's own format.

``dcp.save(sd, storage_writer=ckpt.dcp.Writer(uri))`` (and ``dcp.async_save``) leave a
checkpoint that ``ckpt.load``, ``ckpt.read`` and the CLI read like any other: tensors as
checksummed chunks of global tensors, non-tensor values as typed JSON, one manifest written
last by the commit protocol of :mod:`ckpt.commit`. ``dcp.load(sd, storage_reader=
ckpt.dcp.Reader(uri))`` reads any ckpt checkpoint, whoever wrote it.

What DCP plans stays DCP's (which rank writes which item, which items a rank loads); where
bytes go and how they are checked is ckpt's. Two choices differ from DCP's own storage:

- A value DCP would pickle is stored as a ckpt value (``ckpt.values``: JSON plus typed tags
  for tuples, numpy and RNG states, paths, ...). One that has no such form is refused at
  save, naming its key: nothing pickled is ever stored, so loading never runs code.
- The reader shows DCP each tensor as one chunk covering the whole global tensor, so DCP's
  planner asks for exactly the region each rank needs and ckpt's read planner turns that
  into coalesced, checksum-verified range reads of the stored chunks, whatever their layout.
"""

from __future__ import annotations

import dataclasses
import io
import os
import secrets
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ._version import __version__
from .commit import add_records, commit, write_rank_index
from .engine import write_object
from .errors import CheckpointExistsError
from .format import DATA_DIR, MANIFEST, dtype_name
from .framing import ChunkSpec
from .locate import read_manifest
from .options import LoadOptions, SaveOptions
from .reader import CheckpointReader
from .regions import Box, split_into_chunks
from .storage import Storage, open_storage
from .values import encode, unsupported

__all__ = ["Reader", "Writer"]


@dataclasses.dataclass(frozen=True)
class _RankSlot:
    """What the coordinator tells each rank in its plan: the save's name, its index, the world."""

    save_id: str
    index: int
    world: int


class Writer(StorageWriter):
    """A DCP ``StorageWriter`` that commits a ckpt checkpoint at ``uri``.

    DCP calls, in order: ``reset`` and ``set_up_storage_writer`` (every rank),
    ``prepare_local_plan`` (every rank), ``prepare_global_plan`` (coordinator), ``write_data``
    (every rank: its object of chunks, then its rank index), ``finish`` (coordinator: the head
    of the manifest, then the commit). DCP's coordinator must be rank 0 (its default).
    """

    def __init__(self, uri: str | os.PathLike | None = None, options: SaveOptions | None = None) -> None:
        super().__init__()
        self.options = options or SaveOptions()
        self.uri = None if uri is None else str(uri)
        self._storage: Storage | None = None
        self._slot: _RankSlot | None = None
        self._index: dict[str, Any] | None = None  # the coordinator's, held until finish

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.uri = str(checkpoint_id)
        self._storage, self._slot, self._index = None, None, None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.uri is None:
            raise ValueError("ckpt.dcp.Writer needs a location: Writer(uri) or dcp.save(..., checkpoint_id=uri)")
        rank = kwargs.get("rank", dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
        if is_coordinator and rank != 0:
            raise ValueError(f"ckpt.dcp.Writer needs DCP's coordinator to be rank 0 (it is rank {rank})")
        self._storage = open_storage(self.uri, **self.options.storage_options).confine()
        if self._storage.exists(MANIFEST) and not self.options.overwrite:
            raise CheckpointExistsError(f"{self.uri}: a committed checkpoint exists; pass SaveOptions(overwrite=True)")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        save_id = f"{secrets.token_hex(4)}-dcp"
        return [dataclasses.replace(p, storage_data=_RankSlot(save_id, i, len(plans))) for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's tensor items as one data object, then its index (the durability
        mark); values travel to the coordinator in the write results."""
        slot: _RankSlot = plan.storage_data
        self._slot = slot
        storage = self._require_storage()
        index: dict[str, Any] = {"rank": slot.index, "objects": {}, "chunks": {}}
        results: list[WriteResult] = []
        specs: list[ChunkSpec] = []
        datas: list[torch.Tensor] = []
        problems: list[str] = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                value = _value_of(item, planner)
                encoded = encode(value, item.index.fqn, problems)
                results.append(WriteResult(index=item.index, size_in_bytes=0, storage_data={"value": encoded}))
                continue
            tensor = planner.resolve_data(item).detach()
            box = _box_of(item)
            for sub in split_into_chunks(box, tensor.dtype.itemsize, self.options.chunk_bytes):
                specs.append(ChunkSpec(item.index.fqn, sub, tensor.dtype))
                datas.append(_host_bytes(tensor[sub.relative_to(box).slices()]))
            nbytes = box.numel * tensor.element_size()
            results.append(WriteResult(index=item.index, size_in_bytes=nbytes, storage_data={}))
        if problems:
            raise unsupported(problems)
        if specs:
            order = sorted(range(len(specs)), key=lambda i: -specs[i].dtype.itemsize)  # aligned in place
            specs, datas = [specs[i] for i in order], [datas[i] for i in order]
            rel = f"{DATA_DIR}/{slot.save_id}-r{slot.index:05d}.safetensors"
            records = write_object(storage, rel, specs, datas, slot.save_id, self.options.block_bytes)
            add_records(index, rel, specs, records)
        if slot.index == 0:
            self._index = index  # completed with the manifest's head in finish()
        else:
            write_rank_index(storage, slot.save_id, slot.index, index)
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator: add what only the manifest needs (every tensor's global shape and dtype,
        every rank's values) to rank 0's index, then commit."""
        storage, slot, index = self._require_storage(), self._slot, self._index
        assert slot is not None and index is not None, "finish() before write_data()"
        tensors: dict[str, dict[str, Any]] = {}
        for fqn, meta in metadata.state_dict_metadata.items():
            if isinstance(meta, TensorStorageMetadata):
                dtype = dtype_name(meta.properties.dtype, fqn)
                tensors[fqn] = {"shape": list(meta.size), "dtype": dtype, "layout": "dcp"}
        values = {r.index.fqn: r.storage_data["value"] for rs in results for r in rs if "value" in r.storage_data}
        index.update(
            tensors=tensors,
            values=values,
            block_bytes=self.options.block_bytes,
            step=None,
            metrics={},
            metadata={},
            topology={"world_size": slot.world, "writer": "torch.distributed.checkpoint"},
            library_version=__version__,
            overwrite=self.options.overwrite,  # the committer may replace a committed checkpoint
        )
        write_rank_index(storage, slot.save_id, 0, index)
        commit(storage, slot.save_id, slot.world, self.options.commit_timeout_s)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.uri, save_id=self._slot.save_id if self._slot else "")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def _require_storage(self) -> Storage:
        if self._storage is None:
            raise RuntimeError("ckpt.dcp.Writer used before set_up_storage_writer()")
        return self._storage


def _value_of(item: WriteItem, planner: SavePlanner) -> Any:
    """The object DCP would pickle: from the planner when it keeps it (the default planner
    does), else unpickled from the bytes DCP just produced in this process, never from storage."""
    lookup = getattr(planner, "lookup_object", None)
    if lookup is not None:
        return lookup(item.index)
    buf = planner.resolve_data(item)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _box_of(item: WriteItem) -> Box:
    assert item.tensor_data is not None
    return Box(tuple(item.tensor_data.chunk.offsets), tuple(item.tensor_data.chunk.sizes))


def _host_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu").contiguous().reshape(-1).view(torch.uint8)


class Reader(StorageReader):
    """A DCP ``StorageReader`` for any ckpt checkpoint at ``uri``.

    ``read_metadata`` turns the manifest into DCP's ``Metadata`` (each tensor one chunk
    spanning it); ``read_data`` reads the regions DCP planned through ckpt's reader, which
    verifies every block it reads, and hands values back to DCP as it expects them.
    """

    def __init__(self, uri: str | os.PathLike | None = None, options: LoadOptions | None = None) -> None:
        super().__init__()
        self.options = options or LoadOptions()
        self.uri = None if uri is None else str(uri)
        self._reader: CheckpointReader | None = None

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.uri = str(checkpoint_id)
        self._reader = None

    def _open(self) -> CheckpointReader:
        if self._reader is None:
            if self.uri is None:
                raise ValueError("ckpt.dcp.Reader needs a location: Reader(uri) or dcp.load(..., checkpoint_id=uri)")
            self._reader = CheckpointReader(self.uri, self.options)
        return self._reader

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        manifest = self._open().manifest
        entries: dict[str, Any] = {}
        for key, rec in manifest.tensors.items():
            shape = torch.Size(rec.shape)
            whole = ChunkStorageMetadata(offsets=torch.Size([0] * len(shape)), sizes=shape)
            entries[key] = TensorStorageMetadata(TensorProperties(dtype=rec.dtype), shape, [whole])
        for key in manifest.values:
            entries[key] = BytesStorageMetadata()
        meta = StorageMeta(checkpoint_id=self.uri, save_id=manifest.save_id)
        return Metadata(state_dict_metadata=entries, storage_meta=meta)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._open()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        reader = self._open()
        for item in plan.items:
            key = item.storage_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                buf = io.BytesIO()
                # DCP's planner unpickles what a reader gives it: give it a pickle made here
                # from the value decoded from typed JSON, never bytes taken from storage.
                torch.save(reader.manifest.values[key], buf)
                buf.seek(0)
                planner.load_bytes(item, buf)
                continue
            target = planner.resolve_tensor(item).detach()
            view = target
            for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
                view = view.narrow(dim, start, length)
            box = Box(tuple(item.storage_offsets), tuple(item.lengths))
            reader.read(key, box, out=view)
            planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        try:
            read_manifest(open_storage(str(checkpoint_id)).confine())
        except Exception:
            return False
        return True

