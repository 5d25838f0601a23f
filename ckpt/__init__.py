"""ckpt: distributed checkpointing for PyTorch, stored parallelism-agnostic.

Public API only; see docs/ARCHITECTURE.md for how the pieces fit.
"""

__version__ = "0.1.0"

from .describe import Sharded  # noqa: E402
from .errors import (  # noqa: E402
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
from .format import Manifest  # noqa: E402
from .load import LoadOptions, LoadResult, fill_like_params, load  # noqa: E402
from .manager import Manager  # noqa: E402
from .merge import merge  # noqa: E402  (the function; shadows the subpackage attribute)
from .regions import Box  # noqa: E402
from .retention import RetentionPolicy  # noqa: E402
from .save import SaveHandle, SaveOptions, async_save, save  # noqa: E402
from .tree import read  # noqa: E402

__all__ = [
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
    "RetentionPolicy",
    "SaveAbortedError",
    "SaveBusyError",
    "SaveHandle",
    "SaveOptions",
    "Sharded",
    "StateDictMismatchError",
    "UnsupportedValueError",
    "async_save",
    "fill_like_params",
    "load",
    "merge",
    "read",
    "save",
]
