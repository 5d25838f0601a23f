"""torch.distributed.checkpoint (DCP) directories, read and written by DCP's own code.

DCP's ``.metadata`` is a pickle and its non-tensor items are ``torch.save``
blobs that DCP loads with ``weights_only=False``. Neither may run code here:
the metadata goes through an unpickler that resolves only DCP's metadata
classes, and byte items are loaded with ``weights_only=True``. Everything else
(planning, file layout, reading a tensor's chunks) is DCP's, so any checkpoint
DCP can load converts, and an export is one DCP itself writes.

Memory: reading holds one tensor at a time (DCP reads whole stored items);
writing saves batches of tensors up to a byte cap through DCP's planner and
writer, then one ``.metadata`` for all of them, so nothing is loadable before
every batch is durable.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from ..describe import check_json_value, walk
from ..errors import UnsupportedValueError
from ..regions import Box
from ..storage import open_storage
from .source import ForeignFormatError, Source, TensorInfo

METADATA = ".metadata"

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "MetadataIndex",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata dataclasses, torch.Size, dtypes and layouts."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, torch.dtype):
                return obj
        elif name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise ForeignFormatError(f"DCP metadata refers to {module}.{name}, which is not loaded: it could run code")


def read_metadata(uri: str) -> Metadata:
    """DCP's ``.metadata`` of the checkpoint at ``uri``, unpickled without running code."""
    storage = open_storage(uri)
    where = storage.uri_of(METADATA)
    try:
        raw = storage.read_bytes(METADATA)
    except FileNotFoundError:
        raise ForeignFormatError(f"{uri}: no {METADATA}: not a DCP checkpoint") from None
    try:
        md = _MetadataUnpickler(io.BytesIO(raw)).load()
    except ForeignFormatError as e:
        raise ForeignFormatError(f"{where}: {e}") from None
    except Exception as e:  # truncated or garbage pickles raise many kinds
        raise ForeignFormatError(f"{where}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise ForeignFormatError(f"{where}: not DCP metadata")
    return md


def _reader_class(local: bool) -> type:
    base = FileSystemReader if local else FsspecReader

    class _SafeReader(base):  # type: ignore[valid-type, misc]
        """DCP's reader, with the metadata read by the restricted unpickler (once)."""

        metadata: Metadata | None = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            if self.metadata is None:
                raise RuntimeError("metadata must be set before loading")
            return self.metadata

    return _SafeReader


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, loading non-tensor items with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            fqn = read_item.dest_index.fqn
            raise ForeignFormatError(f"{fqn}: DCP item is not loadable with weights_only=True ({e})") from None
        self.original_state_dict[read_item.dest_index.fqn] = obj


class DcpSource(Source):
    """A DCP checkpoint directory (local or fsspec URL)."""

    format = "dcp"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        path = open_storage(uri).local_path("")
        self.metadata = read_metadata(uri)
        self._reader = _reader_class(path is not None)(uri if path is None else path)
        self._reader.metadata = self.metadata
        self._cached: tuple[str, torch.Tensor] | None = None
        fqns: dict[str, TensorInfo] = {}
        byte_items: list[str] = []
        for fqn, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                fqns[fqn] = TensorInfo(tuple(md.size), md.properties.dtype, "dcp")
            elif isinstance(md, BytesStorageMetadata):
                byte_items.append(fqn)
        raw_values = self._load(dict.fromkeys(byte_items)) if byte_items else {}
        self._keys, self._values = _rekey(fqns, raw_values, self.metadata.planner_data)
        self._tensors = {k: fqns[f] for k, f in sorted(self._keys.items())}

    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def values(self) -> dict[str, Any]:
        return dict(self._values)

    def _load(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        planner = _SafeLoadPlanner(allow_partial_load=True)
        try:
            with _quiet_dcp():
                dcp.load(state_dict, storage_reader=self._reader, planner=planner, no_dist=True)
        except ForeignFormatError:
            raise
        except Exception as e:  # DCP wraps per-rank failures in CheckpointException
            raise ForeignFormatError(f"{self.uri}: DCP could not read {', '.join(state_dict)}: {e}") from None
        return state_dict

    def read(self, key: str, box: Box | None = None) -> torch.Tensor:
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # free the previous tensor before reading the next
            info = self._tensors[key]
            full = torch.empty(info.shape, dtype=info.dtype)
            self._load({self._keys[key]: full})
            self._cached = (key, full)
        full = self._cached[1]
        if box is None or box.sizes == tuple(full.shape):
            return full
        return full[box.slices()].clone()

    def close(self) -> None:
        self._cached = None


@contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP warns that it runs without a process group: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled", category=UserWarning)
        yield


def _rekey(
    tensors: dict[str, TensorInfo], values: dict[str, Any], planner_data: Any
) -> tuple[dict[str, str], dict[str, Any]]:
    """Map DCP's flat names to this library's keys.

    DCP flattens lists of dicts (``opt.param_groups.0.lr``); this library keeps
    a list without tensors as one value (``opt.param_groups``). With DCP's path
    mappings the original nesting is rebuilt and flattened the way ``ckpt.save``
    would, so a converted checkpoint loads into the same state dict.
    Returns (our key -> DCP fqn for tensors, our key -> value).
    """
    paths = planner_data if isinstance(planner_data, dict) else {}
    if not all(isinstance(paths.get(f), tuple) and paths.get(f) for f in [*tensors, *values]):
        paths = {f: (f,) for f in [*tensors, *values]}
    skeleton: dict[str, Any] = {}
    placeholders: dict[int, str] = {}
    for fqn in tensors:
        t = torch.empty(0, device="meta")
        placeholders[id(t)] = fqn
        _set_path(skeleton, paths[fqn], t)
    for fqn, v in values.items():
        _set_path(skeleton, paths[fqn], v)
    keys: dict[str, str] = {}
    out: dict[str, Any] = {}
    try:
        for key, leaf, _ in walk(skeleton):
            if isinstance(leaf, torch.Tensor):
                keys[key] = placeholders[id(leaf)]
            else:
                check_json_value(key, leaf)
                out[key] = leaf
    except UnsupportedValueError as e:
        raise ForeignFormatError(f"DCP value cannot be stored: {e}") from None
    return keys, out


def _set_path(root: dict, path: tuple, value: Any) -> None:
    node: Any = root
    for here, nxt in zip(path[:-1], path[1:]):
        empty: Any = [] if isinstance(nxt, int) else {}
        if isinstance(node, list):
            node.extend([None] * (here + 1 - len(node)))
            if node[here] is None:
                node[here] = empty
            node = node[here]
        else:
            node = node.setdefault(here, empty)
    last = path[-1]
    if isinstance(node, list):
        node.extend([None] * (last + 1 - len(node)))
    node[last] = value


def _writer_class(local: bool) -> type:
    base = FileSystemWriter if local else FsspecWriter

    class _BatchWriter(base):  # type: ignore[valid-type, misc]
        """DCP's writer, naming each batch's files apart so batches add up to one checkpoint."""

        batch = 0

        def prepare_global_plan(self, plans):
            return [
                dataclasses.replace(p, storage_data=_StoragePrefix(f"__{i}_b{self.batch:05d}_"))
                for i, p in enumerate(plans)
            ]

    return _BatchWriter


def _batches(source: Source, max_bytes: int) -> list[list[str]]:
    out: list[list[str]] = [[]]
    size = 0
    for key, info in source.tensors().items():
        if out[-1] and size + info.nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(key)
        size += info.nbytes
    return out


def export_dcp(
    source: Source,
    dst: str,
    batch_bytes: int = 1 << 30,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write ``source`` as a DCP checkpoint ``torch.distributed.checkpoint.load`` reads.

    Tensors are saved in batches of at most ``batch_bytes`` (a larger tensor is
    a batch alone) through DCP's own planner and writer, without a process
    group; ``.metadata`` is written once, last. Returns the number of batches.
    """
    path = open_storage(dst).local_path("")
    # object stores are durable once a PUT returns; fsync there would sync this machine's disks
    writer = _writer_class(path is not None)(dst if path is None else path, sync_files=path is not None)
    writer.set_up_storage_writer(True, rank=0, use_collectives=True)
    tensors = source.tensors()
    values = source.values()
    state_md: dict[str, Any] = {}
    planner_data: dict[str, Any] = {}
    results: list = []
    batches = _batches(source, batch_bytes)
    for b, keys in enumerate(batches):
        batch: dict[str, Any] = {k: source.read(k).contiguous() for k in keys}
        if b == 0:
            batch.update(values)
        planner = DefaultSavePlanner()
        planner.set_up_planner(state_dict=batch, storage_meta=writer.storage_meta(), is_coordinator=True)
        writer.batch = b
        local = writer.prepare_local_plan(planner.create_local_plan())
        plans, md = planner.create_global_plan([local])
        plans = writer.prepare_global_plan(plans)
        final = planner.finish_plan(plans[0])
        fut = writer.write_data(final, planner)
        fut.wait()
        results.extend(fut.value())
        state_md.update(md.state_dict_metadata)
        planner_data.update(md.planner_data or {})
        if progress:
            progress(sum(tensors[k].nbytes for k in keys))
        del batch
    writer.finish(Metadata(state_dict_metadata=state_md, planner_data=planner_data), [results])
    return len(batches)
