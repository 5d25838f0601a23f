"""A Storage that passes every call to another one: wrappers (RAM tier, tee) override what they change.

Each call is forwarded by name, so a wrapper is a complete Storage and a new
protocol method fails loudly here (an abstract method left unimplemented)
instead of slipping past a wrapper unnoticed.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from typing import BinaryIO

from .base import Storage


class DelegatingStorage(Storage):
    """Forwards the protocol to ``inner``; ``uri`` and ``options`` are the inner location's."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.options = inner.options

    def uri_of(self, rel: str) -> str:
        return self.inner.uri_of(rel)

    @property
    def is_remote(self) -> bool:
        return self.inner.is_remote

    @property
    def supports_mapping(self) -> bool:
        return self.inner.supports_mapping

    @property
    def supports_put_if_absent(self) -> bool:
        return self.inner.supports_put_if_absent

    def confine(self) -> Storage:
        confined = copy.copy(self)
        confined.inner = self.inner.confine()
        return confined

    def local_path(self, rel: str) -> str | None:
        return self.inner.local_path(rel)

    def open_write(self, rel: str) -> AbstractContextManager[BinaryIO]:
        return self.inner.open_write(rel)

    def start_writeback(self, f: BinaryIO, start: int, stop: int) -> None:
        self.inner.start_writeback(f, start, stop)

    def put_atomic(self, rel: str, data: bytes) -> None:
        self.inner.put_atomic(rel, data)

    def put_transient(self, rel: str, data: bytes) -> None:
        self.inner.put_transient(rel, data)

    def put_if_absent(self, rel: str, data: bytes) -> bool:
        return self.inner.put_if_absent(rel, data)

    def read_bytes(self, rel: str) -> bytes:
        return self.inner.read_bytes(rel)

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        return self.inner.read_range(rel, start, stop)

    def read_into_many(self, rel: str, start: int, bufs: list[memoryview]) -> None:
        self.inner.read_into_many(rel, start, bufs)

    def map_range(self, rel: str, start: int, stop: int) -> memoryview | None:
        return self.inner.map_range(rel, start, stop)

    def exists(self, rel: str) -> bool:
        return self.inner.exists(rel)

    def size(self, rel: str) -> int:
        return self.inner.size(rel)

    def listdir(self, rel: str) -> list[str]:
        return self.inner.listdir(rel)

    def is_dir(self, rel: str) -> bool:
        return self.inner.is_dir(rel)

    def delete(self, rel: str, recursive: bool = False) -> None:
        self.inner.delete(rel, recursive)

    def remove_empty_dir(self, rel: str) -> None:
        self.inner.remove_empty_dir(rel)

    def invalidate(self) -> None:
        self.inner.invalidate()

    def open_uploads(self) -> list[tuple[str, str, float | None]]:
        return self.inner.open_uploads()

    def abort_upload(self, rel: str, upload_id: str) -> None:
        self.inner.abort_upload(rel, upload_id)
