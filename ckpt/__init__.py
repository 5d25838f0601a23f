"""ckpt: distributed checkpointing for PyTorch, stored parallelism-agnostic.

Public API only; see docs/ARCHITECTURE.md for how the pieces fit.
"""

from ._version import __version__
from .describe import Sharded
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptChunkError,
    SaveAbortedError,
    SaveBusyError,
    StateDictMismatchError,
    UnsupportedValueError,
)
from .format import Manifest
from .load import LoadResult, fill_like_params, load
from .manager import Manager
from .merge import merge  # the function, which shadows the subpackage attribute
from .options import BestMode, LoadOptions, OnBusy, RetentionPolicy, SaveOptions
from .regions import Box
from .save import SaveHandle, async_save, save
from .tree import read

__all__ = [
    "BestMode",
    "Box",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "CorruptChunkError",
    "LoadOptions",
    "LoadResult",
    "Manager",
    "Manifest",
    "OnBusy",
    "RetentionPolicy",
    "SaveAbortedError",
    "SaveBusyError",
    "SaveHandle",
    "SaveOptions",
    "Sharded",
    "StateDictMismatchError",
    "UnsupportedValueError",
    "__version__",
    "async_save",
    "fill_like_params",
    "load",
    "merge",
    "read",
    "save",
]
