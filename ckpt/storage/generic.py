"""The generic backend: any fsspec filesystem (``memory://``, ``gs://``, ...) through fsspec's own calls.

fsspec has no portable fsync, rename or conditional create, so here a write is
as durable as the filesystem makes a closed file, an atomic put is a single
``pipe_file``, and ``put_if_absent`` is unsupported. Every call runs under a
:class:`~ckpt.storage.retry.RetryPolicy` (``storage_options["retry"]``: a
policy or a dict of its fields). The local and S3 backends specialise this
class where fsspec cannot express what they do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, BinaryIO, TypeVar

import fsspec

from .base import Storage
from .retry import RetryPolicy

T = TypeVar("T")


class FsspecStorage(Storage):
    """A location on any fsspec filesystem; ``fs`` and ``root`` are open to tools that walk it."""

    def __init__(self, uri: str, **storage_options: Any) -> None:
        self.uri = uri
        opts = dict(storage_options)
        self.retry = RetryPolicy.of(opts.pop("retry", None))
        if "retry" in storage_options:
            storage_options = {**storage_options, "retry": asdict(self.retry)}
        self.options = storage_options
        self.fs, root = fsspec.core.url_to_fs(uri, **self._fs_options(opts))
        self.root = root.rstrip("/")

    def _fs_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options the filesystem is opened with (backends fill in their defaults)."""
        return options

    def _call(self, operation: str, rel: str, fn: Callable[[], T]) -> T:
        """``fn()`` under the retry policy; errors name ``rel``."""
        return self.retry.call(operation, self.uri_of(rel), fn)

    def path(self, rel: str) -> str:
        """The object's path in ``fs``."""
        return f"{self.root}/{rel}" if rel else self.root

    @property
    def is_remote(self) -> bool:
        return True  # fsspec does not say; assume every call may be a request

    @contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        with self.fs.open(self.path(rel), "wb") as f:
            yield f

    def put_atomic(self, rel: str, data: bytes) -> None:
        self._call("put", rel, lambda: self.fs.pipe_file(self.path(rel), data))

    def read_bytes(self, rel: str) -> bytes:
        return self._call("GetObject", rel, lambda: self.fs.cat_file(self.path(rel)))

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        return self._call(
            f"GetObject bytes [{start}, {stop})", rel, lambda: self.fs.cat_file(self.path(rel), start=start, end=stop)
        )

    def read_into_many(self, rel: str, start: int, bufs: list[memoryview]) -> None:
        """One ranged read of the whole span, copied out into ``bufs``."""
        n = sum(len(b) for b in bufs)
        data = memoryview(self.read_range(rel, start, start + n))
        got, at = len(data), 0
        for b in bufs:
            take = min(len(b), max(0, got - at))
            b[:take] = data[at : at + take]
            at += len(b)
        self._check_length(rel, start, n, got)

    def exists(self, rel: str) -> bool:
        return self._call("exists", rel, lambda: self.fs.exists(self.path(rel)))

    def size(self, rel: str) -> int:
        return int(self._call("size", rel, lambda: self.fs.size(self.path(rel))))

    def _ls(self, path: str) -> list[str]:
        return self.fs.ls(path, detail=False)

    def listdir(self, rel: str) -> list[str]:
        try:
            entries = self._call("list", rel, lambda: self._ls(self.path(rel)))
        except FileNotFoundError:
            return []
        me = self.fs._strip_protocol(self.path(rel)).rstrip("/")
        # an empty "directory" (a key ending in "/") lists as itself on object stores: not a child
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != me)

    def is_dir(self, rel: str) -> bool:
        return self._call("isdir", rel, lambda: self.fs.isdir(self.path(rel)))

    def delete(self, rel: str, recursive: bool = False) -> None:
        try:
            self._call("delete", rel, lambda: self.fs.rm(self.path(rel), recursive=recursive))
        except FileNotFoundError:
            pass

    def remove_empty_dir(self, rel: str) -> None:
        path = self.path(rel)
        try:
            if not self.fs.ls(path, detail=False):
                self.fs.rmdir(path)
        except OSError:  # gone, or not empty after all: someone else's files stay
            pass

    def invalidate(self) -> None:
        self.fs.invalidate_cache()
