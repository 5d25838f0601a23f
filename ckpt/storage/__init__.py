"""Where bytes go: the storage backend protocol, one class per backend, and ``open_storage``.

``base.py`` is the protocol (call order in its docstring); ``local.py``,
``s3.py`` (with ``multipart.py`` and ``retry.py``) and ``generic.py`` (any
other fsspec filesystem) implement it; ``delegate.py`` is the base of
wrappers such as the RAM tier's. Everything else reaches storage through
``open_storage(uri, **storage_options)``.
"""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .base import ConditionalPutUnsupportedError, Storage
from .delegate import DelegatingStorage
from .generic import FsspecStorage
from .local import LocalStorage
from .s3 import S3Storage, is_s3

__all__ = [
    "ConditionalPutUnsupportedError",
    "DelegatingStorage",
    "FsspecStorage",
    "LocalStorage",
    "S3Storage",
    "Storage",
    "open_storage",
]


def open_storage(uri: str, **storage_options: Any) -> FsspecStorage:
    """The backend for ``uri``: S3 for ``s3://`` / ``s3a://``, local disk for paths and
    ``file://``, the generic fsspec backend for anything else (``memory://``, ...).
    ``storage_options`` go to fsspec, except ``retry`` (a RetryPolicy or a dict of its fields)."""
    if is_s3(uri):
        return S3Storage(uri, **storage_options)
    protocol = fsspec.core.split_protocol(uri)[0]
    if "::" not in uri and issubclass(fsspec.get_filesystem_class(protocol or "file"), LocalFileSystem):
        return LocalStorage(uri, **storage_options)
    return FsspecStorage(uri, **storage_options)
