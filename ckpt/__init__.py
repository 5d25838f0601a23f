"""ckpt: distributed checkpointing for PyTorch, stored parallelism-agnostic.

Public API only; see docs/ARCHITECTURE.md for how the pieces fit. Each name is imported on
first use (PEP 562), so ``import ckpt`` (and the ``ckpt`` command's parser) loads no torch
until something needs it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from ._version import __version__ as __version__

_EXPORTS = {  # public name -> the module of this package that defines it
    "Sharded": "describe",
    "CheckpointError": "errors",
    "CheckpointExistsError": "errors",
    "CheckpointFormatError": "errors",
    "CheckpointNotFoundError": "errors",
    "ConcurrentSaveError": "errors",
    "ConditionalPutUnsupportedError": "errors",
    "CorruptChunkError": "errors",
    "MissingObjectError": "errors",
    "RankLostError": "errors",
    "RootInUseError": "errors",
    "SaveAbortedError": "errors",
    "SaveBusyError": "errors",
    "StateDictMismatchError": "errors",
    "StorageFullError": "errors",
    "StorageOperationError": "errors",
    "TruncatedObjectError": "errors",
    "UnsafeObjectError": "errors",
    "UnsupportedValueError": "errors",
    # errors of the interop and merge tools
    "DestinationError": "interop.destination",
    "ForeignFormatError": "interop.source",
    "UncommittedCheckpointError": "interop",
    "UnknownFormatError": "interop.source",
    "UnsafePickleError": "interop.safe_pickle",
    "ModelConfigError": "interop.hf_model",
    "SelectionError": "interop.view",
    "TiedWeightsError": "interop.hf_model",
    "EvaluationError": "merge.errors",
    "MergeError": "merge.errors",
    "SourceMismatchError": "merge.errors",
    "WeightError": "merge.errors",
    "Manifest": "format",
    "LoadResult": "load",
    "fill_like_params": "load",
    "load": "load",
    "Manager": "manager",
    "merge": "merge",
    "BestMode": "options",
    "LoadOptions": "options",
    "OnBusy": "options",
    "RetentionPolicy": "options",
    "SaveOptions": "options",
    "Box": "regions",
    "SaveHandle": "save",
    "async_save": "save",
    "save": "save",
    "read": "tree",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """``ckpt.save``, ``ckpt.load`` and ``ckpt.merge`` are functions named like the submodules
    that define them. Importing such a submodule makes Python set it as an attribute of this
    package (after the submodule has run); the function stays there instead, whichever of the
    two was imported first."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
