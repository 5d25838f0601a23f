"""Open a ``torch.save`` zip without loading it: the pickle through the safe unpickler, storages by ranged reads.

``torch.save`` (since torch 1.6) writes a zip archive, uncompressed: ``<prefix>/data.pkl``
(the object, whose tensors reference storages by key), ``<prefix>/data/<key>``
(each storage's raw bytes, little-endian) and a few small records. Here the zip's
central directory and ``data.pkl`` are read (a few small requests), and every
tensor becomes a :class:`~ckpt.interop.safe_pickle.LazyTensor`: reading a
region later fetches just its bytes from the storage record, located by name.
So one region of a 7B checkpoint costs one ranged read, never the whole file,
and the same code serves local files and object stores. An archive may also sit
inside a larger file (a DCP ``.distcp`` item): pass its byte range.
"""

from __future__ import annotations

import io
import struct
import zipfile
from typing import Any

import torch

from ..framing import as_bytes
from ..storage import Storage, open_storage
from .safe_pickle import StorageRef, load_pickle
from .source import ForeignFormatError

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes


class _RangeFile(io.RawIOBase):
    """Bytes [base, base + size) of a stored object as a seekable file, read by ranged requests."""

    def __init__(self, storage: Storage, rel: str, base: int, size: int) -> None:
        self.storage, self.rel, self.base, self.size, self.pos = storage, rel, base, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        if n:
            data = self.storage.read_range(self.rel, self.base + self.pos, self.base + self.pos + n)
            b[: len(data)] = data
            n = len(data)
        self.pos += n
        return n


class TorchArchive:
    """One ``torch.save`` zip: ``obj`` is what it holds, tensors as lazy views of its storages."""

    def __init__(self, storage: Storage, rel: str, base: int = 0, size: int | None = None) -> None:
        self.storage, self.rel, self.base = storage, rel, base
        self.where = storage.uri_of(rel) + (f" bytes [{base}, {base + size})" if size is not None else "")
        try:
            size = storage.size(rel) - base if size is None else size
        except FileNotFoundError:
            raise ForeignFormatError(f"{self.where}: no such file") from None
        self._data_at: dict[str, int] = {}
        try:
            self._zip = zipfile.ZipFile(io.BufferedReader(_RangeFile(storage, rel, base, size), 1 << 16))
            names = self._zip.namelist()
            pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise ForeignFormatError(f"{self.where}: a zip archive without data.pkl: not a torch.save file")
            self.prefix = pkl[: -len("data.pkl")]
            order = self.prefix + "byteorder"
            if order in names and self._zip.read(order).strip() != b"little":
                raise ForeignFormatError(f"{self.where}: big-endian storages are not supported")
            raw = self._zip.read(pkl)
        except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError) as e:
            raise ForeignFormatError(f"{self.where}: not a readable torch.save zip ({type(e).__name__}: {e})") from None
        self.obj = load_pickle(raw, self.where, self._storage)

    def _storage(self, key: str, dtype: torch.dtype, numel: int) -> StorageRef:
        name = f"{self.prefix}data/{key}"
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise ForeignFormatError(f"{self.where}: storage {key} is referenced but has no record {name}") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise ForeignFormatError(f"{self.where}: storage record {name} is compressed; torch.save never does that")
        nbytes = numel * dtype.itemsize
        if info.file_size < nbytes:
            raise ForeignFormatError(
                f"{self.where}: storage {key} should hold {numel} {dtype} elements ({nbytes} bytes), "
                f"its record has {info.file_size}"
            )
        name = f"{self.where}: storage {key}"
        return StorageRef(name, dtype, numel, lambda a, b, out: self._read(info, dtype, a, b, out))

    def _read(
        self, info: zipfile.ZipInfo, dtype: torch.dtype, start: int, stop: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        at = self._data_at.get(info.filename)
        if at is None:
            hdr = self.base + info.header_offset
            head = self.storage.read_range(self.rel, hdr, hdr + 30)
            sig, *_, n_name, n_extra = _LOCAL_HEADER.unpack(head)
            if sig != b"PK\x03\x04":
                raise ForeignFormatError(f"{self.where}: damaged zip: no local header for {info.filename}")
            at = self._data_at[info.filename] = hdr + 30 + n_name + n_extra
        isz = dtype.itemsize
        out = torch.empty(stop - start, dtype=dtype) if out is None else out
        if stop > start:
            try:
                self.storage.read_into_many(self.rel, at + start * isz, [as_bytes(out)])
            except EOFError as e:
                raise ForeignFormatError(f"{self.where}: {info.filename}: {e}") from None
        return out

    def close(self) -> None:
        self._zip.close()


def open_archive(uri_or_storage: str | Storage, rel: str = "") -> TorchArchive:
    """The ``torch.save`` file at ``uri`` (or ``rel`` under a storage root)."""
    storage = uri_or_storage if isinstance(uri_or_storage, Storage) else None
    if storage is None:
        from .hf import split_uri

        parent, rel = split_uri(str(uri_or_storage))
        storage = open_storage(parent)
    return TorchArchive(storage, rel)
