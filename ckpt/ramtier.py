"""RAM tier: a node keeps the latest checkpoint's data objects in host memory.

The daemon writes each data object twice as it persists it: to storage and to
a tmpfs directory (/dev/shm is RAM). A job restarted on the same node asks the
daemon where that copy is and, if it belongs to the very save the storage
manifest names, reads those objects from memory; anything else (objects other
nodes wrote, a stale or missing copy) comes from storage. Checksums are
verified either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from typing import BinaryIO

from .format import DATA_DIR
from .storage import DelegatingStorage, LocalStorage, Storage


def copy_dir(base: str, uri: str) -> str:
    """Where the RAM copy of checkpoint ``uri`` lives under ``base``."""
    return os.path.join(base, hashlib.sha256(uri.encode()).hexdigest()[:24])


class TeeStorage(DelegatingStorage):
    """A Storage whose data objects are also written to a local directory."""

    def __init__(self, storage: Storage, directory: str) -> None:
        super().__init__(storage)
        self.directory = directory
        self.written: dict[str, int] = {}  # object name -> bytes
        self._opened: list[str] = []

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        if not rel.startswith(f"{DATA_DIR}/"):
            with self.inner.open_write(rel) as f:
                yield f
            return
        path = os.path.join(self.directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._opened.append(path)
        with self.inner.open_write(rel) as f, open(path, "wb", buffering=0) as copy:
            tee = _Tee(f, copy)
            yield tee  # type: ignore[misc]
        self.written[rel] = tee.n

    def discard(self) -> None:
        """Remove the copies this writer made (other ranks' copies stay)."""
        for path in self._opened:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.written.clear()


class _Tee:
    def __init__(self, primary: BinaryIO, copy: BinaryIO) -> None:
        self.primary, self.copy, self.n = primary, copy, 0

    def write(self, buf) -> int:
        view = memoryview(buf)
        done = 0
        while done < len(view):
            k = self.primary.write(view[done:])
            done += len(view) - done if k is None else k
        mirrored = 0
        while mirrored < done:
            mirrored += self.copy.write(view[mirrored:done])
        self.n += done
        return done


class RamTierStorage(DelegatingStorage):
    """A Storage that serves some objects' reads from a local RAM copy.

    Only ``read_into_many`` is routed (it is what the load path reads data
    objects with), so mapping is off: every read passes the router.
    """

    def __init__(self, storage: Storage, directory: str, objects: set[str]) -> None:
        super().__init__(storage)
        self._copy = LocalStorage(directory)
        self.objects = objects
        self.bytes_from_ram = 0

    @property
    def supports_mapping(self) -> bool:
        return False

    def map_range(self, rel: str, start: int, stop: int) -> None:
        return None

    def read_into_many(self, rel: str, start: int, bufs: list[memoryview]) -> None:
        if rel in self.objects:
            self._copy.read_into_many(rel, start, bufs)
            self.bytes_from_ram += sum(len(b) for b in bufs)
        else:
            self.inner.read_into_many(rel, start, bufs)
