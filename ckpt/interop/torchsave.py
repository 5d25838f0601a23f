"""``torch.save`` files: read through the safe unpickler (never running code), written whole.

A zip file (torch.save's format since 1.6) is opened as a :class:`TorchArchive`:
its pickle through the deny-by-default unpickler, each tensor a lazy view whose
bytes are fetched by a ranged read of its storage record when a slab of it is
asked for, on local disks and object stores alike. Foreign records it may hold
(an ``argparse.Namespace``...) become JSON values. A legacy (pre-zip) file is
read with ``torch.load(weights_only=True)``, a remote one after a local copy.
Writing needs the whole state dict in memory, which is what ``torch.save`` itself requires.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from typing import Any

import torch

from ..describe import check_json_value, walk
from ..errors import UnsupportedValueError
from ..format import dtype_name
from ..regions import Box
from ..storage import open_storage
from .hf import split_uri
from .safe_pickle import LazyTensor, Record, to_plain
from .source import ForeignFormatError, Source, TensorInfo
from .torchzip import TorchArchive

# torch.save's legacy (pre-zip) files start with a pickled magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def looks_like_torch_save(head: bytes) -> bool:
    """Zip archives (torch.save's format since 1.6) or the legacy pickle stream."""
    return head.startswith(b"PK\x03\x04") or head.startswith(LEGACY_MAGIC)


class TorchSaveSource(Source):
    """A state dict saved with ``torch.save`` (nested dicts/lists of tensors and plain values)."""

    format = "torch"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        parent, name = split_uri(uri)
        self._data: dict[str, torch.Tensor | LazyTensor] = {}
        self._values: dict[str, Any] = {}
        archive_storage = open_storage(parent)
        try:
            head = archive_storage.read_range(name, 0, 4)
        except FileNotFoundError:
            raise ForeignFormatError(f"{uri}: no such file") from None
        if head == b"PK\x03\x04":
            self._flatten(_skeleton(TorchArchive(archive_storage, name).obj))
            return
        storage = open_storage(uri)
        self._tmpdir: str | None = None
        path = storage.local_path("")
        if path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="ckpt-torchsave-")
            path = os.path.join(self._tmpdir, "state.pt")
            storage.fs.get_file(storage.root, path)
        try:
            obj = _load(path, uri)
        finally:
            if self._tmpdir:  # the mapping keeps the data reachable; the name is not needed
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                self._tmpdir = None
        self._flatten((obj, {}))

    def _flatten(self, skeleton: tuple[Any, dict[int, LazyTensor]]) -> None:
        """Flat keys the way ``ckpt.save`` makes them; meta placeholders stand for lazy tensors."""
        obj, lazy = skeleton
        if not isinstance(obj, dict):
            raise ForeignFormatError(f"{self.uri}: holds a {type(obj).__name__}, not a state dict")
        try:
            for key, leaf, _ in walk(obj):
                if isinstance(leaf, torch.Tensor):
                    if leaf.layout != torch.strided or leaf.is_nested:
                        raise UnsupportedValueError(f"{key}: {leaf.layout} tensors cannot be stored")
                    dtype_name(leaf.dtype, key)
                    self._data[key] = lazy.get(id(leaf), leaf)
                else:
                    check_json_value(key, leaf)
                    self._values[key] = leaf
        except UnsupportedValueError as e:
            raise ForeignFormatError(f"{self.uri}: {e}") from None
        self._tensors = {k: TensorInfo(tuple(t.shape), t.dtype) for k, t in sorted(self._data.items())}

    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def values(self) -> dict[str, Any]:
        return dict(self._values)

    def read(self, key: str, box: Box | None = None) -> torch.Tensor:
        t = self._data[key]
        if isinstance(t, LazyTensor):
            return t.read(box)
        return t if box is None else t[box.slices()]

    def close(self) -> None:
        self._data = {}


def _skeleton(obj: Any) -> tuple[Any, dict[int, LazyTensor]]:
    """``obj`` with each lazy tensor replaced by a meta placeholder (found again by id) and
    each foreign record by its JSON form, so the state dict flattens as ``ckpt.save`` would."""
    lazy: dict[int, LazyTensor] = {}

    def conv(v: Any) -> Any:
        if isinstance(v, LazyTensor):
            t = torch.empty(v.shape, dtype=v.dtype, device="meta")
            lazy[id(t)] = v
            return t
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, tuple):
            return tuple(conv(x) for x in v)
        return to_plain(v) if isinstance(v, Record) else v

    return conv(obj), lazy


def _load(path: str, uri: str) -> Any:
    try:
        mmap = zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise ForeignFormatError(
            f"{uri}: refused: it holds objects that torch.load(weights_only=True) does not allow, "
            f"and loading them could run code ({_why(str(e))})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ForeignFormatError(f"{uri}: not a readable torch.save file ({type(e).__name__}: {e})") from None


def _why(message: str) -> str:
    """The line of torch's weights_only error that names the refused object."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line.rstrip(".")
    return lines[-1] if lines else "weights_only refused it"


def export_torch(source: Source, dst: str, progress: Callable[[int], None] | None = None) -> None:
    """Write ``source`` as one ``torch.save`` file: a flat dict of tensors and values.

    Needs every tensor in memory at once (torch.save's own requirement). Local
    files appear atomically (written aside, then renamed); object stores get one PUT.
    """
    state: dict[str, Any] = {}
    for key, info in source.tensors().items():
        state[key] = source.read(key).clone()
        if progress:
            progress(info.nbytes)
    state.update(source.values())
    path = open_storage(dst).local_path("")
    if path is not None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        parent, name = split_uri(dst)
        with open_storage(parent).open_write(name) as f:
            torch.save(state, f)
