"""Unpickle foreign checkpoint files without running code: data types only, foreign classes as inert records.

Deny by default. A pickle may name only:

- containers and scalars (``collections.OrderedDict``, ``set``, ``frozenset``,
  ``bytearray``, ``complex``, ``slice``; ``bytes`` through ``_codecs.encode``
  with latin-1 only), ``torch.Size``, ``torch.device``, dtypes and layouts;
- torch's tensor rebuild functions and storage types (the plain, parameter and
  subclass-wrapper paths ``torch.load(weights_only=True)`` allows), which here
  build a :class:`LazyTensor`: shape, stride and a reference to the storage
  record, whose bytes stay in the file until a region is read;
- the foreign classes named in :data:`FOREIGN_CLASSES` (DCP plans and metadata,
  Megatron-Core sharded records, ByteCheckpoint metadata, DeepSpeed's loss
  scaler, stage enum and fragment addresses, ``argparse.Namespace``, numpy
  arrays and scalars...), which
  become :class:`Record` instances: the class name, constructor arguments and
  state as plain data. The class itself is never imported, so none of its code
  (``__reduce__``, ``__setstate__``, ``__init__``) runs.

Anything else raises :class:`UnsafePickleError` naming the file and the class.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..regions import Box
from .source import ForeignFormatError


class UnsafePickleError(ForeignFormatError):
    """A pickle names a class or function that is neither plain data nor a known foreign record."""


# Foreign classes read as records: full name -> who writes it (for docs and error messages).
FOREIGN_CLASSES: dict[str, str] = {
    **{
        f"torch.distributed.checkpoint.metadata.{n}": "torch DCP"
        for n in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "MetadataIndex",
            "_MEM_FORMAT_ENCODING",
        )
    },
    **{
        f"torch.distributed.checkpoint.planner.{n}": "torch DCP"
        for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem", "LoadItemType")
    },
    "torch.distributed.checkpoint.filesystem._StorageInfo": "torch DCP",
    "torch.distributed.checkpoint.filesystem._StoragePrefix": "torch DCP",
    **{f"pathlib.{n}": "python" for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")},
    "argparse.Namespace": "python",
    # numpy arrays and scalars (RNG states in Megatron's ShardedObjects, scalars in args): kept as data
    **{
        f"{m}.{n}": "numpy"
        for m in ("numpy.core.multiarray", "numpy._core.multiarray")
        for n in ("_reconstruct", "scalar")
    },
    "numpy.ndarray": "numpy",
    "numpy.dtype": "numpy",
    **{
        f"megatron.core.dist_checkpointing.mapping.{n}": "Megatron-Core"
        for n in ("ShardedTensor", "ShardedObject", "ShardedTensorFactory", "LocalNonpersistentObject")
    },
    "megatron.core.dist_checkpointing.strategies.torch.MCoreSavePlan": "Megatron-Core",
    "megatron.core.dist_checkpointing.strategies.torch.MCoreMetadata": "Megatron-Core",
    "megatron.core.enums.ModelType": "Megatron-Core",
    "megatron.core.transformer.enums.AttnBackend": "Megatron-Core",
    "megatron.core.transformer.enums.AttnMaskType": "Megatron-Core",
    "megatron.core.rerun_state_machine.RerunMode": "Megatron-Core",
    **{
        f"bytecheckpoint.checkpointer.meta_type.{n}": "ByteCheckpoint"
        for n in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "_StorageInfo",
            "_MEM_FORMAT_ENCODING",
            "BasicMeta",
            "ShardMeta",
            "SavePlan",
            "WriteItem",
            "WriteItemType",
            "TensorWriteData",
        )
    },
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": "DeepSpeed",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": "DeepSpeed",
    "deepspeed.runtime.zero.config.ZeroStageEnum": "DeepSpeed",
    "deepspeed.utils.tensor_fragment.fragment_address": "DeepSpeed",
    "deepspeed.checkpoint.constants.UNIVERSAL_CHECKPOINT_INFO": "DeepSpeed",
}


class Record:
    """An object of a foreign class, kept as data: ``cls`` (its full name), ``args`` (what its
    constructor was called with), ``state`` (what unpickling set on it). Never imported, never run."""

    __slots__ = ("args", "kwargs", "state")
    cls: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def fields(self) -> dict[str, Any]:
        """The object's attributes (its ``__dict__`` and slots, as pickled)."""
        st = self.state
        if isinstance(st, tuple) and len(st) == 2 and (st[0] is None or isinstance(st[0], dict)):
            return {**(st[0] or {}), **(st[1] or {})}
        return dict(st) if isinstance(st, dict) else {}

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    @property
    def value(self) -> Any:
        """An enum member's value (its single constructor argument)."""
        return self.args[0] if len(self.args) == 1 else None

    def __repr__(self) -> str:
        return f"<{self.cls} args={self.args!r} state={self.state!r}>"


_RECORD_CLASSES: dict[str, type[Record]] = {}


def record_class(full_name: str) -> type[Record]:
    """The one :class:`Record` subclass standing for ``full_name``."""
    rc = _RECORD_CLASSES.get(full_name)
    if rc is None:
        rc = type(full_name.rpartition(".")[2], (Record,), {"__slots__": (), "cls": full_name})
        _RECORD_CLASSES[full_name] = rc
    return rc


def to_plain(obj: Any) -> Any:
    """``obj`` with records, tuples, sets and torch scalars turned into JSON-able data; tensors kept as they are."""
    if isinstance(obj, Record):
        out: dict[str, Any] = {"__class__": obj.cls}
        if obj.args:
            out["args"] = to_plain(list(obj.args))
        fields = obj.fields
        if fields:
            out.update({str(k): to_plain(v) for k, v in fields.items()})
        elif obj.state is not None:
            out["state"] = to_plain(obj.state)
        return out
    if isinstance(obj, dict):
        return {k if isinstance(k, (str, int)) else str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_plain(v) for v in obj), key=repr)
    if isinstance(obj, (torch.dtype, torch.device, torch.layout)):
        return str(obj)
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if isinstance(obj, complex):
        return [obj.real, obj.imag]
    if isinstance(obj, slice):
        return [obj.start, obj.stop, obj.step]
    return obj


# ---- tensors: shape, stride and a storage reference; bytes stay in the file -------------------------------


# reads elements [start, stop) of a storage, into the given 1-D tensor or a new one
Reader = Callable[[int, int, "torch.Tensor | None"], torch.Tensor]


class _Inert:
    """Refuses pickle's BUILD, so a hostile pickle cannot overwrite this object's fields."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise ForeignFormatError(f"a pickle tried to set the state of a {type(self).__name__}")


class StorageRef(_Inert):
    """One storage of a ``torch.save`` archive: its dtype, length, and how to read a range of it."""

    __slots__ = ("name", "dtype", "numel", "_read")

    def __init__(self, name: str, dtype: torch.dtype, numel: int, read: Reader):
        self.name, self.dtype, self.numel, self._read = name, dtype, numel, read

    def read(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) as a 1-D tensor, read into ``out`` when given (reads only those bytes)."""
        if not 0 <= start <= stop <= self.numel:
            raise ForeignFormatError(f"{self.name}: elements [{start}, {stop}) outside the storage's {self.numel}")
        return self._read(start, stop, out)


@dataclass(slots=True)
class LazyTensor(_Inert):
    """A pickled tensor not yet read: a strided view of a storage. ``read`` fetches only the bytes of a box."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    attrs: Any = None  # what a tensor subclass or a tensor with attributes carried (e.g. DeepSpeed's ds_id)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def is_contiguous(self) -> bool:
        expect = 1
        for size, st in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and st != expect:
                return False
            expect *= size
        return True

    def read(self, box: Box | None = None) -> torch.Tensor:
        """Region ``box`` (default: all) as a CPU tensor of its own memory."""
        box = box or Box.full(self.shape)
        if box.is_empty():
            return torch.empty(box.sizes, dtype=self.dtype)
        first = self.offset + sum(o * s for o, s in zip(box.offsets, self.stride))
        last = self.offset + sum((e - 1) * s for e, s in zip(box.ends, self.stride))
        flat = self.storage.read(first, last + 1)
        view = flat.as_strided(box.sizes, self.stride)
        return view if view.is_contiguous() and view.numel() == flat.numel() else view.clone()

    def read_flat(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) of the row-major flattening, read into ``out`` when given."""
        if not self.is_contiguous():
            flat = self.read().reshape(-1)[start:stop]
            return flat if out is None else out.copy_(flat)
        return self.storage.read(self.offset + start, self.offset + stop, out)


class _Marker(_Inert):
    """A name a pickle may mention but never call (tensor types passed to torch's rebuild helpers)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _storage_dtype(name: str) -> torch.dtype | None:
    if name == "UntypedStorage":
        return torch.uint8
    if not name.endswith("Storage"):
        return None
    try:
        return torch.serialization.StorageType(name).dtype
    except (AttributeError, RuntimeError, KeyError):
        return None


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> LazyTensor:
    return _lazy(storage, offset, size, stride, None)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None) -> LazyTensor:
    return _lazy(storage, offset, size, stride, dtype)


def _lazy(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None) -> LazyTensor:
    if not isinstance(storage, StorageRef):
        raise ForeignFormatError(f"tensor rebuilt from {type(storage).__name__}, not a storage record")
    if not (isinstance(offset, int) and _ints(size) and _ints(stride) and len(size) == len(stride)):
        raise ForeignFormatError(f"{storage.name}: malformed tensor geometry {offset!r} {size!r} {stride!r}")
    dtype = dtype or storage.dtype
    if not isinstance(dtype, torch.dtype):
        raise ForeignFormatError(f"{storage.name}: dtype {dtype!r} is not a torch dtype")
    if dtype != storage.dtype:  # an untyped storage reinterpreted (bytes): rescale the element counts
        if storage.dtype != torch.uint8:
            raise ForeignFormatError(f"{storage.name}: {dtype} view of a {storage.dtype} storage")
        storage = _ByteView(storage, dtype)
    t = LazyTensor(storage, offset, tuple(size), tuple(stride), dtype)
    if t.numel and (offset < 0 or any(s < 0 for s in stride)):
        raise ForeignFormatError(f"{storage.name}: negative offset or stride")
    if t.numel:
        last = offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
        if last >= storage.numel:
            raise ForeignFormatError(
                f"{storage.name}: tensor of shape {list(t.shape)} reaches element {last}, "
                f"the storage holds {storage.numel}"
            )
    return t


class _ByteView(StorageRef):
    """An untyped (byte) storage read as ``dtype`` elements."""

    __slots__ = ()

    def __init__(self, raw: StorageRef, dtype: torch.dtype) -> None:
        isz = dtype.itemsize
        super().__init__(
            raw.name,
            dtype,
            raw.numel // isz,
            lambda a, b, out: raw.read(a * isz, b * isz, None if out is None else out.view(torch.uint8)).view(dtype),
        )


def _ints(xs: Any) -> bool:
    return isinstance(xs, (tuple, list, torch.Size)) and all(isinstance(x, int) and x >= 0 for x in xs)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, state: Any = None) -> Any:
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func not in _REBUILDERS or not isinstance(args, tuple):
        raise ForeignFormatError(f"tensor subclass rebuilt through {func!r}, which is not a tensor rebuild function")
    t = func(*args)
    if isinstance(t, LazyTensor) and state:
        t.attrs = state
    return t


_REBUILDERS = {_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter}


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ForeignFormatError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


def _layout(name: Any) -> torch.layout:
    layout = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(layout, torch.layout):
        raise ForeignFormatError(f"unknown tensor layout {name!r}")
    return layout


_TORCH_CALLABLES: dict[str, Any] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Tensor": _Marker("torch.Tensor"),
    "torch.nn.parameter.Parameter": _Marker("torch.nn.Parameter"),
    "torch.serialization._get_layout": _layout,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": bytearray,
    "builtins.complex": complex,
    "builtins.slice": slice,
    "_codecs.encode": _latin1,
}


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose every global goes through the allow-list above.

    ``storage`` resolves a torch persistent id (``("storage", type, key, location, numel)``)
    to a :class:`StorageRef`; without it a pickle that references storages is refused.
    ``extra`` adds record classes a particular source knows."""

    def __init__(
        self,
        file: io.BufferedIOBase,
        where: str,
        storage: Callable[[str, torch.dtype, int], StorageRef] | None = None,
        extra: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(file)
        self.where, self._storage, self._extra = where, storage, extra

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names, as protocol 2 writes them (__builtin__.set), mapped as pickle itself does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        found = _TORCH_CALLABLES.get(full)
        if found is not None:
            return found
        if module == "torch":
            obj = getattr(torch, name, None) if not name.startswith("_") else None
            if isinstance(obj, torch.dtype):
                return obj
            dtype = _storage_dtype(name)
            if dtype is not None:
                return _Marker(f"storage:{name}:{dtype}")
        if full in FOREIGN_CLASSES or full in self._extra:
            return record_class(full)
        raise UnsafePickleError(
            f"{self.where}: refers to {full}, which is not loaded: it is neither plain data nor a known "
            "checkpoint record, and loading it could run code"
        )

    def persistent_load(self, pid: Any) -> Any:
        if (
            self._storage is None
            or not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] not in ("storage", b"storage")
            or not isinstance(pid[1], _Marker)
            or not pid[1].name.startswith("storage:")
            or not isinstance(pid[4], int)
        ):
            raise UnsafePickleError(f"{self.where}: persistent id {pid!r:.200} is not a torch storage reference")
        key = pid[2].decode() if isinstance(pid[2], bytes) else str(pid[2])
        dtype = _storage_dtype(pid[1].name.split(":")[1])
        assert dtype is not None
        return self._storage(key, dtype, pid[4])


def load_pickle(
    data: bytes,
    where: str,
    storage: Callable[[str, torch.dtype, int], StorageRef] | None = None,
    extra: frozenset[str] = frozenset(),
) -> Any:
    """Unpickle ``data`` (read from ``where``, named in errors) without running code."""
    try:
        return SafeUnpickler(io.BytesIO(data), where, storage, extra).load()
    except ForeignFormatError:
        raise
    except Exception as e:  # truncated or malformed pickles raise many kinds
        raise ForeignFormatError(f"{where}: unreadable pickle ({type(e).__name__}: {e})") from None
