"""A read-only view of any checkpoint format, one tensor region at a time.

Conversion, export, diff and resharding all consume a :class:`Source`, so each
format needs only a reader, and every tool works between any two formats.
Tools read row-major slabs (see :func:`slabs`), which every format can serve
without holding more than one slab (or, for DCP, one tensor) in memory.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointFormatError
from ..options import LoadOptions
from ..reader import CheckpointReader
from ..regions import Box, split_into_chunks


class UnknownFormatError(CheckpointError):
    """The path holds nothing this library can read as a checkpoint."""


class ForeignFormatError(CheckpointFormatError):
    """A checkpoint in a foreign format is damaged or holds something unsafe to load."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str = ""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class SourceInfo:
    """What a checkpoint says about itself beyond its tensors (carried across conversions)."""

    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    structure: Any = None  # the saved nesting (a ckpt version 2 checkpoint's); None: unknown


class Source(ABC):
    """A checkpoint opened for reading in some format."""

    format: str = ""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    @abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's global shape and dtype, in a stable order."""

    def values(self) -> dict[str, Any]:
        """Non-tensor entries (JSON values), by flat key."""
        return {}

    def info(self) -> SourceInfo:
        return SourceInfo()

    @abstractmethod
    def read(self, key: str, box: Box | None = None) -> torch.Tensor:
        """Region ``box`` (default: all) of tensor ``key`` as a CPU tensor.

        It may share memory with the source (a memory map, a cache): do not modify it."""

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release what the source holds (open files, cached tensors)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def slabs(info: TensorInfo, max_bytes: int) -> list[Box]:
    """Row-major slabs of at most ``max_bytes`` covering a whole tensor, in flat order.

    Each slab is contiguous in the tensor's row-major flattening, so formats
    that store tensors contiguously serve it with one range read."""
    return split_into_chunks(Box.full(info.shape), info.dtype.itemsize, max_bytes)


class CkptSource(Source):
    """A checkpoint in this library's format (reads only the bytes asked for)."""

    format = "ckpt"

    def __init__(self, uri: str, options: LoadOptions | None = None) -> None:
        super().__init__(uri)
        self.reader = CheckpointReader(uri, options)
        self._tensors = {
            k: TensorInfo(tuple(r.shape), r.dtype, r.layout) for k, r in sorted(self.reader.manifest.tensors.items())
        }

    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def values(self) -> dict[str, Any]:
        return dict(self.reader.values)

    def info(self) -> SourceInfo:
        m = self.reader.manifest
        return SourceInfo(m.step, dict(m.metrics), dict(m.metadata), m.structure)

    def read(self, key: str, box: Box | None = None) -> torch.Tensor:
        return self.reader.read(key, box)
