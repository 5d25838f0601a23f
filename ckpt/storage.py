"""Where bytes go: a thin layer over fsspec.

Only two things differ by backend, because fsspec cannot express them: local
files are made durable with fsync and committed with an atomic rename; object
stores are durable once a PUT returns and commit with a single PUT.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem


class Storage:
    """A checkpoint location: a directory or object-store prefix."""

    def __init__(self, uri: str, **storage_options) -> None:
        self.uri = uri
        self.options = storage_options  # kept so another process (the daemon) can reopen it
        self.fs, self.root = fsspec.core.url_to_fs(uri, **storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = self.root.rstrip("/")

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def describe(self, rel: str) -> str:
        return f"{self.uri.rstrip('/')}/{rel}"

    @contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        """A file whose bytes are durable when the block exits without error."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb", buffering=0) as f:
                yield f
                os.fsync(f.fileno())
        else:
            with self.fs.open(path, "wb") as f:
                yield f

    def put_atomic(self, rel: str, data: bytes) -> None:
        """Make ``data`` appear at ``rel`` all at once, or not at all."""
        path = self.path(rel)
        if self.local:
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            self.fs.pipe_file(path, data)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        return self.fs.cat_file(self.path(rel), start=start, end=stop)

    def read_into_many(self, rel: str, start: int, bufs: list[memoryview]) -> None:
        """Fill ``bufs`` in order with the object's bytes from ``start`` (a scatter read).

        Local files are read straight into the buffers (no intermediate copy);
        other backends fetch the range with one request and copy it out.
        """
        n = sum(len(b) for b in bufs)
        if self.local:
            got = 0
            fd = os.open(self.path(rel), os.O_RDONLY)
            try:
                pending = [b for b in bufs if len(b)]
                while pending:
                    k = os.preadv(fd, pending[:1024], start + got)  # IOV_MAX
                    if k == 0:
                        break
                    got += k
                    while pending and k >= len(pending[0]):
                        k -= len(pending[0])
                        pending.pop(0)
                    if pending and k:
                        pending[0] = pending[0][k:]
            finally:
                os.close(fd)
        else:
            data = memoryview(self.read_range(rel, start, start + n))
            got, at = len(data), 0
            for b in bufs:
                take = min(len(b), max(0, got - at))
                b[:take] = data[at : at + take]
                at += len(b)
        if got < n:
            raise EOFError(
                f"{self.describe(rel)}: bytes [{start}, {start + n}) requested, object ends at {start + got}"
            )

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def delete(self, rel: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=recursive)
        except FileNotFoundError:
            pass

    def invalidate(self) -> None:
        """Forget cached listings (object stores) so polling sees new objects."""
        self.fs.invalidate_cache()
