"""Hugging Face safetensors: a single file, or shards with ``*.safetensors.index.json``.

Reading parses the safetensors header (plain JSON) and fetches each requested
slab with one range read, so it works the same on local paths and fsspec URLs
and never holds more than one slab. Writing follows the Hub's conventions
(``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json``), streams each tensor slab by slab, and
writes the index last.

A model directory whose ``config.json`` ties weights (``lm_head.weight`` to
``model.embed_tokens.weight``) stores the tie's source only; its target is served
too, as the same bytes, so a model's state dict, which names both, loads strictly (not for
``ckpt info``, which lists what the files hold without importing transformers).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointFormatError
from ..framing import as_bytes, frame_order, read_safetensors_header, safetensors_header, write_all
from ..regions import Box, row_major_strides
from ..storage import open_storage
from ..values import decode, dumps, encode_checked
from .hf_model import CONFIG, tied_for_reading
from .source import ForeignFormatError, Source, SourceInfo, TensorInfo, slabs

if TYPE_CHECKING:
    from ..storage import FsspecStorage, LocalStorage

INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_INDEX = "model" + INDEX_SUFFIX
SINGLE_FILE = "model.safetensors"
VALUES_KEY = "ckpt_values"  # JSON of non-tensor entries, kept in metadata so a round trip keeps them


def split_uri(uri: str) -> tuple[str, str]:
    """(parent, name) of a file URI, keeping any ``scheme://``."""
    uri = uri.rstrip("/")
    head, sep, name = uri.rpartition("/")
    if not sep:
        return ".", uri
    if head.endswith(":/"):  # "memory://x"
        return head + "/", name
    return head or "/", name


class _File:
    """One safetensors file: its parsed header and where its data starts."""

    def __init__(self, storage: FsspecStorage | LocalStorage, rel: str) -> None:
        self.storage, self.rel = storage, rel
        where = storage.uri_of(rel)
        try:
            size = storage.size(rel)
        except FileNotFoundError:
            raise ForeignFormatError(f"{where}: no such file") from None
        try:
            header = read_safetensors_header(lambda start, stop: storage.read_range(rel, start, stop), size, where)
        except CheckpointFormatError as e:
            raise ForeignFormatError(str(e)) from None
        self.metadata: dict[str, str] = header.metadata
        self.entries: dict[str, tuple[TensorInfo, int]] = {
            name: (TensorInfo(e.shape, e.dtype), e.start) for name, e in header.entries.items()
        }

    def read(self, key: str, box: Box) -> torch.Tensor:
        """Read the smallest flat range that holds ``box``, then view the box in it."""
        info, at = self.entries[key]
        if box.is_empty():
            return torch.empty(box.sizes, dtype=info.dtype)
        strides = row_major_strides(info.shape)
        first = sum(o * s for o, s in zip(box.offsets, strides))
        last = sum((e - 1) * s for e, s in zip(box.ends, strides))
        isz = info.dtype.itemsize
        buf = torch.empty((last - first + 1) * isz, dtype=torch.uint8)
        try:
            self.storage.read_into_many(self.rel, at + first * isz, [as_bytes(buf)])
        except EOFError as e:
            raise ForeignFormatError(f"{key}: {e}") from None
        flat = buf.view(info.dtype)
        if last - first + 1 == box.numel:  # a row-major slab: the range is the box
            return flat.view(box.sizes)
        return flat.as_strided(box.sizes, strides).clone()


class SafetensorsSource(Source):
    """A safetensors file, or a directory of shards listed by an index. ``tied=False`` lists what
    the files hold and leaves a model directory's tied weights unresolved: resolving them asks
    transformers (seconds of import), which describing the files (``ckpt info``) does not need."""

    format = "safetensors"

    def __init__(self, uri: str, tied: bool = True) -> None:
        super().__init__(uri)
        storage = open_storage(uri)
        self._files: dict[str, _File] = {}
        self._where: dict[str, _File] = {}
        self._values: dict[str, Any] = {}
        self._stored: dict[str, str] = {}  # a tied weight's name -> the name its bytes are stored under
        if storage.fs.isfile(storage.root):
            parent, name = split_uri(uri)
            f = _File(open_storage(parent), name)
            self._files[name] = f
            self._where = {k: f for k in f.entries}
            self._values = _parse_values(f.metadata.get(VALUES_KEY), storage.uri_of(""))
            return
        names = storage.listdir("")
        indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
        if len(indexes) > 1:
            raise ForeignFormatError(f"{uri}: several safetensors indexes ({', '.join(indexes)}); pass one file")
        if indexes:
            self._open_index(storage, indexes[0])
        else:
            files = [n for n in names if n.endswith(".safetensors")]
            if len(files) != 1:
                raise ForeignFormatError(f"{uri}: {len(files)} .safetensors files and no {DEFAULT_INDEX}")
            f = _File(storage, files[0])
            self._files[files[0]] = f
            self._where = {k: f for k in f.entries}
            self._values = _parse_values(f.metadata.get(VALUES_KEY), storage.uri_of(files[0]))
        local = storage.local_path("")
        if tied and CONFIG in names and local is not None:
            for target, src in tied_for_reading(local).items():
                if src in self._where and target not in self._where:
                    self._where[target], self._stored[target] = self._where[src], src

    def _open_index(self, storage: FsspecStorage | LocalStorage, index_name: str) -> None:
        where = storage.uri_of(index_name)
        try:
            index = json.loads(storage.read_bytes(index_name))
            weight_map: dict[str, str] = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ForeignFormatError(f"{where}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        for name in sorted(set(weight_map.values())):
            if "/" in name or name in ("", ".", ".."):
                raise ForeignFormatError(f"{where}: shard name {name!r} is not a file in the index's directory")
            self._files[name] = _File(storage, name)
        for key, name in weight_map.items():
            if key not in self._files[name].entries:
                raise ForeignFormatError(f"{where}: {key} is mapped to {name}, which does not hold it")
            self._where[key] = self._files[name]
        meta = index.get("metadata") or {}
        self._values = _parse_values(meta.get(VALUES_KEY), where)

    def tensors(self) -> dict[str, TensorInfo]:
        return {k: f.entries[self._stored.get(k, k)][0] for k, f in sorted(self._where.items())}

    def values(self) -> dict[str, Any]:
        return dict(self._values)

    def info(self) -> SourceInfo:
        return SourceInfo()

    def read(self, key: str, box: Box | None = None) -> torch.Tensor:
        f, name = self._where[key], self._stored.get(key, key)
        return f.read(name, box or Box.full(f.entries[name][0].shape))


def _parse_values(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        values = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as e:
        raise ForeignFormatError(f"{where}: {VALUES_KEY} metadata is not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ForeignFormatError(f"{where}: {VALUES_KEY} metadata is not a JSON object")
    try:
        return {k: decode(v) for k, v in values.items()}
    except CheckpointFormatError as e:
        raise ForeignFormatError(f"{where}: {VALUES_KEY}: {e}") from None


def plan_shards(tensors: dict[str, TensorInfo], max_shard_bytes: int | None) -> list[list[str]]:
    """Greedy, in key order, like the Hub's splitter: a new shard when the next
    tensor would overflow the current one; a tensor larger than the limit goes alone."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, info in tensors.items():
        if max_shard_bytes is not None and shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += info.nbytes
    return shards


def export_safetensors(
    source: Source,
    dst: str,
    max_shard_bytes: int | None = None,
    slab_bytes: int = 64 << 20,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Write ``source``'s tensors as HF safetensors; return the files written.

    ``dst`` ending in ``.safetensors`` is one file; otherwise a directory with
    ``model.safetensors`` or, when several shards are needed, numbered shards
    and ``model.safetensors.index.json`` (written last). Non-tensor values are
    kept as JSON under the ``ckpt_values`` metadata key.
    """
    tensors = source.tensors()
    values = source.values()
    encoded = {k: encode_checked(v, k) for k, v in values.items()}  # standard JSON, typed as in a manifest
    meta = {"format": "pt"}
    if dst.rstrip("/").endswith(".safetensors"):
        parent, name = split_uri(dst)
        if values:
            meta[VALUES_KEY] = dumps(encoded)
        _write_file(source, open_storage(parent), name, tensors, list(tensors), meta, slab_bytes, progress)
        return [name]
    storage = open_storage(dst)
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        if values:
            meta[VALUES_KEY] = dumps(encoded)
        _write_file(source, storage, SINGLE_FILE, tensors, shards[0], meta, slab_bytes, progress)
        return [SINGLE_FILE]
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, keys in zip(names, shards):
        _write_file(source, storage, name, tensors, keys, meta, slab_bytes, progress)
        weight_map.update({k: name for k in keys})
    index: dict[str, Any] = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    if values:
        index["metadata"][VALUES_KEY] = encoded
    storage.put_atomic(DEFAULT_INDEX, dumps(index, indent=2).encode())
    return [*names, DEFAULT_INDEX]


def _write_file(
    source: Source,
    storage: FsspecStorage | LocalStorage,
    rel: str,
    tensors: dict[str, TensorInfo],
    keys: list[str],
    metadata: dict[str, str],
    slab_bytes: int,
    progress: Callable[[int], None] | None,
) -> None:
    order = frame_order(keys, lambda k: tensors[k].dtype)
    header = safetensors_header(((k, tensors[k].dtype, tensors[k].shape) for k in order), metadata)
    with storage.open_write(rel) as f:
        write_all(f, memoryview(header))
        for k in order:
            for box in slabs(tensors[k], slab_bytes):
                data = source.read(k, box).contiguous()
                if data.numel():
                    write_all(f, as_bytes(data))
                if progress:
                    progress(box.numel * tensors[k].dtype.itemsize)
