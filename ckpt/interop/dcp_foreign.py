"""DCP-shaped checkpoints that pickle foreign classes (Megatron-Core ``torch_dist``, ByteCheckpoint), read as records.

Both write DCP's layout: a ``.metadata`` pickle (tensor fqn -> global size,
dtype and chunk boxes; chunk -> file, byte offset, length) and ``__R_0.distcp``
data files. Their metadata names classes DCP's own reader refuses (Megatron's
plans and ``mcore_data``; ByteCheckpoint's ``Metadata`` and ``_StorageInfo``),
so here it is read with the safe unpickler as records and interpreted directly:

- DCP and Megatron store each chunk as a small ``torch.save`` zip inside the data
  file; ByteCheckpoint stores the chunk's raw storage bytes and keeps the pickled
  tensor header (shape, stride, storage reference) in ``all_tensor_metadata``.
  Either way a chunk becomes a lazy tensor, and reading a region of a global
  tensor reads only the intersecting part of each chunk that holds it.
- Byte items (Megatron ``ShardedObject``s, ``param_groups``...) are ``torch.save``
  blobs: their tensors become tensor keys, the rest JSON values.

Megatron: ``iter_NNNNNNN/`` (or the root, through ``latest_checkpointed_iteration.txt``)
with ``common.pt`` (values ``common.<key>``) and ``metadata.json``; keys are
Megatron's own (``decoder.layers.mlp.linear_fc1.weight`` layer-stacked,
``optimizer.state.exp_avg.<param>``, ``optimizer.state.fp32_param.<param>``...).
ByteCheckpoint: a step directory with ``model/``, ``optimizer/`` (keys
``model.<fqn>``, ``optimizer.<fqn>``) and ``extra_state/`` (values ``extra_state.<key>``).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..describe import check_json_value
from ..errors import UnsupportedValueError
from ..framing import as_bytes
from ..regions import Box, row_major_strides
from ..storage import Storage, open_storage
from .safe_pickle import LazyTensor, Record, StorageRef, load_pickle, to_plain
from .source import ForeignFormatError, Source, SourceInfo, TensorInfo
from .torchzip import TorchArchive

METADATA = ".metadata"
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
BYTECHECKPOINT_PARTS = ("model", "optimizer")
# ByteCheckpoint's FSDP (1) metadata: how each flat parameter splits into the original ones
FSDP_META = ("fsdp_flat_param_to_fqns", "fsdp_is_padding_mask", "fsdp_numels_with_padding", "fsdp_shapes")
FLAT_PARAM = "_flat_param"
EXTRA_STATE = "extra_state"


def _fields(obj: Any, where: str, *names: str) -> list[Any]:
    if not isinstance(obj, Record):
        raise ForeignFormatError(f"{where}: expected a record, found {type(obj).__name__}")
    f = obj.fields
    return [f.get(n) for n in names]


class _Chunk:
    def __init__(self, box: Box, open_: Any) -> None:
        self.box, self._open, self._t = box, open_, None

    def tensor(self) -> LazyTensor:
        if self._t is None:
            self._t = self._open()
        return self._t


class DcpRecords:
    """One DCP-shaped directory (``prefix`` under ``storage``): its tensors as chunk lists, its byte items."""

    def __init__(self, storage: Storage, prefix: str = "") -> None:
        self.storage, self.prefix = storage, prefix
        where = storage.uri_of(prefix + METADATA)
        try:
            raw = storage.read_bytes(prefix + METADATA)
        except FileNotFoundError:
            raise ForeignFormatError(f"{where}: no such file") from None
        md = load_pickle(raw, where)
        self.metadata = md
        sdm, storage_data, headers = _fields(md, where, "state_dict_metadata", "storage_data", "all_tensor_metadata")
        if not isinstance(sdm, dict) or not isinstance(storage_data, dict):
            raise ForeignFormatError(f"{where}: no state_dict_metadata / storage_data")
        located: dict[tuple, tuple[Record, Any]] = {}
        for idx, info in storage_data.items():
            fqn, offset = _fields(idx, where, "fqn", "offset")
            located[(fqn, tuple(offset) if offset is not None else None)] = (info, (headers or {}).get(idx))
        self.tensors: dict[str, tuple[TensorInfo, list[_Chunk]]] = {}
        self.byte_items: dict[str, Any] = {}
        for fqn, rec in sdm.items():
            if not isinstance(rec, Record):
                raise ForeignFormatError(f"{where}: {fqn}: unexpected metadata {type(rec).__name__}")
            if rec.cls.endswith("BytesStorageMetadata"):
                loc = located.get((fqn, None))
                if loc is None:
                    raise ForeignFormatError(f"{where}: byte item {fqn} has no storage entry")
                self.byte_items[fqn] = loc[0]
                continue
            props, size, chunks = _fields(rec, where, "properties", "size", "chunks")
            (dtype,) = _fields(props, where, "dtype")
            if dtype is None and isinstance(props, Record) and isinstance(props.state, tuple) and props.state:
                dtype = props.state[0]  # TensorProperties pickles as (dtype, layout, requires_grad, ...)
            if not isinstance(dtype, torch.dtype) or not isinstance(chunks, list):
                raise ForeignFormatError(f"{where}: {fqn}: malformed tensor metadata")
            shape = tuple(int(s) for s in size)
            out = []
            for c in chunks:
                offsets, sizes = _fields(c, where, "offsets", "sizes")
                box = Box(tuple(int(o) for o in offsets), tuple(int(s) for s in sizes))
                loc = located.get((fqn, box.offsets))
                if loc is None:
                    raise ForeignFormatError(f"{where}: {fqn}: chunk at {list(box.offsets)} has no storage entry")
                out.append(_Chunk(box, lambda loc=loc, fqn=fqn, dtype=dtype: self._open_chunk(fqn, dtype, *loc)))
            self.tensors[fqn] = (TensorInfo(shape, dtype), out)

    def _locate(self, info: Record) -> tuple[str, int, int]:
        where = self.storage.uri_of(self.prefix + METADATA)
        rel, offset, length = _fields(info, where, "relative_path", "offset", "length")
        rel = str(rel)
        if "/" in rel or rel in ("", ".", "..") or not isinstance(offset, int) or not isinstance(length, int):
            raise ForeignFormatError(f"{self.storage.uri_of(self.prefix + METADATA)}: bad storage entry {rel!r}")
        return self.prefix + rel, offset, length

    def _open_chunk(self, fqn: str, dtype: torch.dtype, info: Record, header: bytes | None) -> LazyTensor:
        rel, offset, length = self._locate(info)
        where = f"{self.storage.uri_of(rel)} bytes [{offset}, {offset + length}) ({fqn})"
        if header is None:  # DCP / Megatron: a torch.save zip
            t = TorchArchive(self.storage, rel, offset, length).obj
        else:  # ByteCheckpoint: raw storage bytes; the tensor's pickled header elsewhere

            def raw(key: str, st_dtype: torch.dtype, numel: int) -> StorageRef:
                if numel * st_dtype.itemsize > length:
                    raise ForeignFormatError(f"{where}: storage of {numel} {st_dtype} does not fit")

                def read(a: int, b: int, out: torch.Tensor | None) -> torch.Tensor:
                    out = torch.empty(b - a, dtype=st_dtype) if out is None else out
                    if b > a:
                        self.storage.read_into_many(rel, offset + a * st_dtype.itemsize, [as_bytes(out)])
                    return out

                return StorageRef(where, st_dtype, numel, read)

            t = load_pickle(bytes(header), where, raw)
        if not isinstance(t, LazyTensor) or t.dtype != dtype:
            raise ForeignFormatError(f"{where}: does not hold a {dtype} tensor")
        return t

    def read(self, fqn: str, box: Box) -> torch.Tensor:
        info, chunks = self.tensors[fqn]
        out = torch.empty(box.sizes, dtype=info.dtype)
        covered = 0
        for c in chunks:
            inter = box.intersect(c.box)
            if inter is None or inter.is_empty():
                continue
            t = c.tensor()
            if tuple(t.shape) != c.box.sizes:
                raise ForeignFormatError(f"{fqn}: chunk at {list(c.box.offsets)} holds shape {list(t.shape)}")
            out[inter.relative_to(box).slices()] = t.read(inter.relative_to(c.box))
            covered += inter.numel
        if covered != box.numel:
            raise ForeignFormatError(f"{self.storage.uri}: {fqn}: chunks cover {covered} of {box.numel} elements")
        return out

    def byte_item(self, fqn: str) -> Any:
        rel, offset, length = self._locate(self.byte_items[fqn])
        head = self.storage.read_range(rel, offset, offset + 4)
        if head == b"PK\x03\x04":
            return TorchArchive(self.storage, rel, offset, length).obj
        raw = self.storage.read_range(rel, offset, offset + length)
        return load_pickle(raw, f"{self.storage.uri_of(rel)}: {fqn}")


class _RecordSource(Source):
    """Tensors from DCP-shaped parts plus values; keys are ``<part prefix><fqn>``."""

    def _setup(self) -> None:
        self._where: dict[str, tuple[DcpRecords, str]] = {}
        self._slices: dict[str, tuple[DcpRecords, str, int, tuple[int, ...]]] = {}  # a range of a flat tensor
        self._lazy: dict[str, LazyTensor] = {}
        self._values: dict[str, Any] = {}

    def _add_part(self, part: DcpRecords, prefix: str) -> None:
        for fqn in part.tensors:
            self._where[prefix + fqn] = (part, fqn)
        for fqn in part.byte_items:
            self._add_object(prefix + fqn, part.byte_item(fqn))

    def _add_object(self, key: str, obj: Any) -> None:
        """Tensors inside ``obj`` become tensor keys, everything else JSON values."""
        if isinstance(obj, LazyTensor):
            self._lazy[key] = obj
        elif isinstance(obj, dict) and obj and all(isinstance(k, (str, int)) for k in obj):
            for k, v in obj.items():
                self._add_object(f"{key}.{k}", v)
        elif isinstance(obj, (list, tuple)) and _holds_tensor(obj):
            for i, v in enumerate(obj):
                self._add_object(f"{key}.{i}", v)
        else:
            v = to_plain(obj)
            try:
                check_json_value(key, v)
            except UnsupportedValueError as e:
                raise ForeignFormatError(f"{self.uri}: {e}") from None
            self._values[key] = v

    def tensors(self) -> dict[str, TensorInfo]:
        out = {k: p.tensors[f][0] for k, (p, f) in self._where.items()}
        out.update({k: TensorInfo(shape, p.tensors[f][0].dtype) for k, (p, f, _, shape) in self._slices.items()})
        out.update({k: TensorInfo(t.shape, t.dtype) for k, t in self._lazy.items()})
        return dict(sorted(out.items()))

    def values(self) -> dict[str, Any]:
        return dict(self._values)

    def read(self, key: str, box: Box | None = None) -> torch.Tensor:
        if key in self._lazy:
            return self._lazy[key].read(box)
        if key in self._slices:
            part, fqn, start, shape = self._slices[key]
            box = box or Box.full(shape)
            if box.is_empty():
                return torch.empty(box.sizes, dtype=part.tensors[fqn][0].dtype)
            strides = row_major_strides(shape)
            first = sum(o * s for o, s in zip(box.offsets, strides))
            last = sum((e - 1) * s for e, s in zip(box.ends, strides))
            flat = part.read(fqn, Box((start + first,), (last - first + 1,)))
            return flat.view(box.sizes) if flat.numel() == box.numel else flat.as_strided(box.sizes, strides).clone()
        part, fqn = self._where[key]
        return part.read(fqn, box or Box.full(part.tensors[fqn][0].shape))


def _overlap(a: str, b: str) -> str:
    """The longest suffix of ``a`` that starts ``b`` (ByteCheckpoint joins names this way)."""
    return next((a[-i:] for i in range(len(a), 0, -1) if b.startswith(a[-i:])), "")


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, LazyTensor):
        return True
    if isinstance(obj, dict):
        return any(_holds_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(v) for v in obj)
    return False


class MegatronSource(_RecordSource):
    """A Megatron-Core ``torch_dist`` checkpoint: an ``iter_*`` directory, or the root naming its latest."""

    format = "megatron"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self._setup()
        storage = open_storage(uri)
        names = set(storage.listdir(""))
        prefix = ""
        if METADATA not in names:
            if MEGATRON_TRACKER not in names:
                raise ForeignFormatError(f"{uri}: no {METADATA} and no {MEGATRON_TRACKER}")
            it = storage.read_bytes(MEGATRON_TRACKER).decode().strip()
            if not it.isdigit():
                raise ForeignFormatError(f"{storage.uri_of(MEGATRON_TRACKER)}: {it!r} is not an iteration")
            prefix = f"iter_{int(it):07d}/"
        self.prefix = prefix
        self._add_part(DcpRecords(storage, prefix), "")
        self.meta: dict[str, Any] = {}
        try:
            self.meta = json.loads(storage.read_bytes(prefix + "metadata.json"))
        except FileNotFoundError:
            pass
        except ValueError as e:
            raise ForeignFormatError(f"{storage.uri_of(prefix + 'metadata.json')}: {e}") from None
        if storage.exists(prefix + "common.pt"):
            common = TorchArchive(storage, prefix + "common.pt").obj
            if not isinstance(common, dict):
                raise ForeignFormatError(f"{storage.uri_of(prefix + 'common.pt')}: not a dict")
            for k, v in common.items():
                self._add_object(f"common.{k}", v)

    def info(self) -> SourceInfo:
        it = self._values.get("common.iteration")
        meta = {"source_format": "megatron", **self.meta}
        return SourceInfo(step=it if isinstance(it, int) else None, metadata=meta)


class ByteCheckpointSource(_RecordSource):
    """A ByteCheckpoint step directory: ``model/``, ``optimizer/`` (DCP-shaped) and ``extra_state/``."""

    format = "bytecheckpoint"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self._setup()
        storage = open_storage(uri)
        names = set(storage.listdir(""))
        parts = [p for p in BYTECHECKPOINT_PARTS if p in names]
        if METADATA in names:  # one part opened directly
            part = DcpRecords(storage, "")
            self._add_part(part, "")
            self._user(part, "")
            return
        if not parts:
            raise ForeignFormatError(f"{uri}: no model/ or optimizer/ directory with {METADATA}")
        users = []
        for p in parts:
            part = DcpRecords(storage, p + "/")
            self._add_part(part, p + ".")
            users.append(self._user(part, p + "."))
        for user in users:
            self._decompose(user)
        if EXTRA_STATE in names:
            files = sorted(n for n in storage.listdir(EXTRA_STATE) if n.endswith(".pt"))
            for n in files:
                obj = TorchArchive(storage, f"{EXTRA_STATE}/{n}").obj
                self._add_object(f"{EXTRA_STATE}.{n[:-3]}", obj)

    def _user(self, part: DcpRecords, prefix: str) -> dict:
        fields = part.metadata.fields
        user, version = fields.get("user_defined_dict"), fields.get("bytecheckpoint_version")
        if user:
            self._add_object(f"{prefix}user_defined_dict", user)
        if version is not None:
            self._values[f"{prefix}bytecheckpoint_version"] = str(version)
        return user if isinstance(user, dict) else {}

    def _decompose(self, user: dict) -> None:
        """FSDP (1) flat parameters as the original ones: each a range of its flat parameter, named the way
        ByteCheckpoint's own merge names it (the flat key without ``_flat_param``, then the parameter's fqn);
        every tensor keyed by the flat parameter (its optimizer states too) is split the same way."""
        to_fqns, padding, numels, shapes = (user.get(k) for k in FSDP_META)
        if not all(isinstance(x, dict) for x in (to_fqns, padding, numels, shapes)):
            return
        for flat_key, fqns in to_fqns.items():
            base = flat_key.replace(FLAT_PARAM, "")
            ranges, at, i = [], 0, 0
            for n, pad in zip(numels[flat_key], padding[flat_key]):
                if not pad:
                    fqn, shape = fqns[i], tuple(int(s) for s in shapes[flat_key][i])
                    ranges.append((base + fqn[len(_overlap(base, fqn)) :], at, shape))
                    i += 1
                at += int(n)
            for key in [k for k in self._where if k.endswith(flat_key) or f"{flat_key}." in k]:
                part, fqn = self._where.pop(key)
                info = part.tensors[fqn][0]
                if info.shape == ():  # a per-parameter scalar (step): the same for each
                    for name, _, _ in ranges:
                        self._where[key.replace(flat_key, name)] = (part, fqn)
                    continue
                if len(info.shape) != 1 or info.shape[0] < at:
                    raise ForeignFormatError(f"{self.uri}: {key} has shape {list(info.shape)}, its split needs {at}")
                for name, start, shape in ranges:
                    self._slices[key.replace(flat_key, name)] = (part, fqn, start, shape)

    def info(self) -> SourceInfo:
        return SourceInfo(metadata={"source_format": "bytecheckpoint"})


def foreign_dcp_format(storage: Storage, names: set[str]) -> str | None:
    """``megatron`` / ``bytecheckpoint`` when a directory holds one of them, else None."""
    if MEGATRON_TRACKER in names or "common.pt" in names or "metadata.json" in names:
        return "megatron"
    if any(p in names for p in BYTECHECKPOINT_PARTS) and any(
        storage.exists(f"{p}/{METADATA}") for p in BYTECHECKPOINT_PARTS if p in names
    ):
        return "bytecheckpoint"
    if METADATA in names:
        raw = storage.read_bytes(METADATA)
        if b"bytecheckpoint.checkpointer" in raw:
            return "bytecheckpoint"
        if b"megatron.core" in raw:
            return "megatron"
    return None
