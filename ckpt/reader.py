"""Offline access to a committed checkpoint, one tensor region at a time.

Tools (CLI, merging, conversion) read through this rather than through a full
state dict, so memory stays bounded by the regions they ask for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from . import refs
from .describe import Piece, TensorEntry
from .errors import CheckpointFormatError, CorruptChunkError, StorageOperationError
from .fetch import check_holds
from .format import Chunk, Manifest, TensorRecord
from .load import read_tensors
from .locate import read_manifest
from .options import LoadOptions
from .regions import Box
from .storage import open_storage


class CheckpointReader:
    """A committed checkpoint opened for reading (manifest parsed once)."""

    def __init__(self, uri: str, options: LoadOptions | None = None) -> None:
        self.options = options or LoadOptions()
        self.storage = open_storage(uri, **self.options.storage_options).confine()
        self.manifest: Manifest = read_manifest(self.storage)
        self._sizes: dict[str, int] = {}  # objects' real sizes, once asked

    def check_holds(self, chunks: Iterable[Chunk]) -> None:
        """See :func:`ckpt.fetch.check_holds` (object sizes cached for this reader)."""
        check_holds(refs.reading(self.storage, self.manifest), chunks, self._sizes)

    @property
    def uri(self) -> str:
        return self.storage.uri

    def keys(self) -> list[str]:
        return sorted(self.manifest.tensors)

    def record(self, key: str) -> TensorRecord:
        try:
            return self.manifest.tensors[key]
        except KeyError:
            raise KeyError(f"{self.uri}: no tensor {key!r} in the checkpoint") from None

    @property
    def values(self) -> dict[str, Any]:
        return self.manifest.values

    def read(self, key: str, box: Box | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read ``box`` (default: all) of tensor ``key``, reading only the bytes it needs.

        ``out``, if given, receives the data (any dtype: values are cast).
        """
        rec = self.record(key)
        box = box or Box.full(rec.shape)
        if not box.fits_in(rec.shape):
            raise ValueError(f"{self.uri}: {key}: region {box} lies outside shape {rec.shape}")
        if out is None:
            self.check_holds(c for c in rec.chunks if c.box.intersect(box) is not None or box.is_empty())
            out = torch.empty(box.sizes, dtype=rec.dtype)
        elif tuple(out.shape) != box.sizes:
            raise ValueError(f"{key}: out has shape {tuple(out.shape)}, region is {box.sizes}")
        entry = TensorEntry(key, out, rec.shape, (Piece(box, (0,) * box.ndim),), "")
        read_tensors(self.storage, self.manifest, {key: entry}, self.options)
        return out

    def iter_chunks(self, key: str) -> Iterator[tuple[Box, torch.Tensor]]:
        """Each stored chunk of ``key`` with its data, in stored order (bounded memory)."""
        for c in self.record(key).chunks:
            yield c.box, self.read(key, c.box)

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Read every chunk and check every block checksum; return one line per failure.

        ``progress``, if given, is called with each chunk's byte count once it is checked.
        """
        failures = []
        opts = LoadOptions(verify=True, storage_options=self.options.storage_options)
        for key, rec in sorted(self.manifest.tensors.items()):
            for c in rec.chunks:
                try:
                    self.check_holds([c])  # before allocating what the manifest claims
                    entry = TensorEntry(
                        key,
                        torch.empty(c.box.sizes, dtype=rec.dtype),
                        rec.shape,
                        (Piece(c.box, (0,) * c.box.ndim),),
                        "",
                    )
                    read_tensors(self.storage, _only(self.manifest, key, c), {key: entry}, opts)
                except CorruptChunkError as e:
                    failures.append(str(e))
                except (CheckpointFormatError, StorageOperationError) as e:
                    failures.append(f"{key} chunk {c.box}: {type(e).__name__}: {e}")
                if progress is not None:
                    progress(c.length)
        return failures


def _only(manifest: Manifest, key: str, chunk: Chunk) -> Manifest:
    """A view of the manifest where ``key`` has just ``chunk`` (to read it in isolation)."""
    rec = manifest.tensors[key]
    one = TensorRecord(rec.shape, rec.dtype_name, [chunk], rec.layout)
    return dataclasses.replace(manifest, tensors={key: one}, values={})
