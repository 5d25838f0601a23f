"""Where bytes go: the storage backend protocol, one class per backend, and ``open_storage``.

``base.py`` is the protocol (call order in its docstring); ``local.py``,
``s3.py`` (with ``multipart.py`` and ``retry.py``) and ``generic.py`` (any
other fsspec filesystem) implement it; ``delegate.py`` is the base of
wrappers such as the RAM tier's. Everything else reaches storage through
``open_storage(uri, **storage_options)``. The local backend is built on ``os``
alone; the fsspec-based ones (and fsspec) are imported when a URI needs one,
so the ``ckpt`` command lists and describes local checkpoints without loading it.
"""

from __future__ import annotations

from typing import Any

from .base import ConditionalPutUnsupportedError, Storage, is_s3
from .delegate import DelegatingStorage
from .local import LocalStorage, is_local

__all__ = [
    "ConditionalPutUnsupportedError",
    "DelegatingStorage",
    "FsspecStorage",
    "LocalStorage",
    "S3Storage",
    "Storage",
    "open_storage",
]


def open_storage(uri: str, **storage_options: Any) -> Storage:
    """The backend for ``uri``: S3 for ``s3://`` / ``s3a://``, local disk for paths and
    ``file://``, the generic fsspec backend for anything else (``memory://``, ...).
    ``storage_options`` go to fsspec, except ``retry`` (a RetryPolicy or a dict of its fields)."""
    if is_s3(uri):
        from .s3 import S3Storage

        return S3Storage(uri, **storage_options)
    if is_local(uri):
        return LocalStorage(uri, **storage_options)
    from .generic import FsspecStorage

    return FsspecStorage(uri, **storage_options)


def __getattr__(name: str) -> Any:
    """The fsspec-based backends on first use (PEP 562): importing them imports fsspec."""
    if name == "FsspecStorage":
        from .generic import FsspecStorage

        return FsspecStorage
    if name == "S3Storage":
        from .s3 import S3Storage

        return S3Storage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
