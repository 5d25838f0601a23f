"""The storage backend protocol: what the save, commit and load paths ask of a checkpoint location.

A location is a directory or object-store prefix; objects are named by paths
relative to it (``rel``). Every backend gives the same guarantees, each in its
own way: a write is durable when it returns, an atomic put is seen whole or
not at all, a conditional put creates an object only if none is there.

Call order on save (``ckpt.engine``, then ``ckpt.commit``): each rank
``open_write`` s its data object (``start_writeback`` hints as bytes stream
out) and leaves the block only once the bytes are durable, then
``put_atomic`` s its index under ``_staging/``; a committer polls
(``invalidate``, ``listdir``, ``exists``, ``read_bytes``), ``put_atomic`` s
the manifest, then ``delete`` s what the commit replaced. A failing rank ``put_atomic`` s an error report instead.

Call order on load (``ckpt.load`` / ``ckpt.fetch``): ``read_bytes`` the
manifest, then per planned read either ``read_into_many`` (one request per
coalesced range) or, where ``supports_mapping``, small ``read_into_many``
pieces and ``map_range`` views of the page cache. ``read_range``, ``size``
and ``listdir`` (with ``is_dir``) serve tools (catalog, gc, interop); ``open_uploads`` /
``abort_upload`` let gc clean up after killed writers.

Errors name the object (``uri_of(rel)``); a missing object raises
``FileNotFoundError``; a short object raises ``TruncatedObjectError``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any, BinaryIO

from ..errors import ConditionalPutUnsupportedError, TruncatedObjectError


def uri_scheme(uri: str) -> str | None:
    """``s3`` for ``s3://bucket/key``, None for a plain path: the protocol as fsspec splits it,
    told without importing fsspec (the local backend never loads it)."""
    scheme, sep, _ = uri.partition("://")
    return scheme if sep and len(scheme) > 1 else None  # one letter is a Windows drive


def is_s3(uri: str) -> bool:
    return uri_scheme(uri) in ("s3", "s3a")


class Storage(ABC):
    """A checkpoint location; see the module docstring for the call order."""

    uri: str
    options: dict[str, Any]  # JSON-able: ``open_storage(uri, **options)`` reopens it (the daemon does)

    def uri_of(self, rel: str) -> str:
        """The object's URI, as errors name it."""
        return f"{self.uri.rstrip('/')}/{rel}"

    # -- what the backend is -------------------------------------------------------------------

    @property
    @abstractmethod
    def is_remote(self) -> bool:
        """Whether each call may be a request over the network: pollers back off further."""

    @property
    def supports_mapping(self) -> bool:
        """Whether ``map_range`` maps objects and small ``read_into_many`` calls cost a pread
        (local files), so readers may read in small pieces straight into their targets."""
        return False

    @property
    def supports_put_if_absent(self) -> bool:
        """Whether ``put_if_absent`` works here rather than raising ConditionalPutUnsupportedError."""
        return False

    def confine(self) -> Storage:
        """This location as a checkpoint is read: objects are regular files inside it, never a
        symlink, FIFO or directory (local files; object stores have none). Foreign formats read
        through the plain storage, so a Hugging Face cache's symlinked snapshots still load."""
        return self

    def local_path(self, rel: str) -> str | None:
        """Where the object is on this machine's file system, for tools that need a real file
        (a kernel-side copy, DCP's file reader); None where objects are not local files."""
        return None

    # -- writing -------------------------------------------------------------------------------

    @abstractmethod
    def open_write(self, rel: str) -> AbstractContextManager[BinaryIO]:
        """A write-only file whose bytes are durable (and visible) once the block exits without
        error; on an error nothing partial is published where the backend can prevent it."""

    def start_writeback(self, f: BinaryIO, start: int, stop: int) -> None:
        """Hint that bytes [start, stop) of ``f`` (from ``open_write``) are final. No-op by default."""
        return None

    @abstractmethod
    def put_atomic(self, rel: str, data: bytes) -> None:
        """Make ``data`` appear at ``rel`` all at once, durably, replacing what was there."""

    def put_transient(self, rel: str, data: bytes) -> None:
        """Like ``put_atomic`` but need not be durable (a heartbeat, rewritten every few seconds):
        a local disk skips the fsyncs, which a busy disk can hold up for seconds."""
        self.put_atomic(rel, data)

    def put_if_absent(self, rel: str, data: bytes) -> bool:
        """Like ``put_atomic`` if nothing is at ``rel``: True if this call created the object,
        False if one was already there (left unchanged). Of concurrent callers at most one wins."""
        raise ConditionalPutUnsupportedError(
            f"{self.uri_of(rel)}: {type(self).__name__} has no conditional create (create-if-absent)"
        )

    # -- reading -------------------------------------------------------------------------------

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The whole object."""

    @abstractmethod
    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of the object (fewer if it ends first)."""

    @abstractmethod
    def read_into_many(self, rel: str, start: int, bufs: list[memoryview]) -> None:
        """Fill ``bufs`` in order with the object's bytes from ``start`` (a scatter read);
        TruncatedObjectError if the object ends first."""

    def map_range(self, rel: str, start: int, stop: int) -> memoryview | None:
        """Bytes [start, stop) mapped without a read copy, or None where unsupported."""
        return None

    # -- listing and deleting ------------------------------------------------------------------

    @abstractmethod
    def exists(self, rel: str) -> bool:
        """Whether the object (or, for ``""``, the location) exists now, never from a cache."""

    @abstractmethod
    def size(self, rel: str) -> int:
        """The object's size in bytes."""

    @abstractmethod
    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``, sorted; empty if it does not exist."""

    def is_dir(self, rel: str) -> bool:
        """Whether ``rel`` (``""``: the location) is a directory; where there are no directories
        (object stores), a prefix with objects under it, which is what this default tells."""
        return bool(self.listdir(rel))

    @abstractmethod
    def delete(self, rel: str, recursive: bool = False) -> None:
        """Remove the object (or the tree under ``rel``); gone already is fine."""

    @abstractmethod
    def remove_empty_dir(self, rel: str) -> None:
        """Remove the directory ``rel`` only if it is empty, never anything in it: a writer
        that cleans up after itself must not delete what another writer put there since.
        Not empty or gone already is fine; a no-op where directories do not exist (S3)."""

    def invalidate(self) -> None:
        """Forget cached listings so polling sees objects other writers added. No-op by default."""
        return None

    def open_uploads(self) -> list[tuple[str, str, float | None]]:
        """Unfinished multipart uploads under this location: (path relative to it, upload id,
        start time). Only object stores have them; a killed writer leaves them behind."""
        return []

    def abort_upload(self, rel: str, upload_id: str) -> None:
        """Discard an unfinished upload found by ``open_uploads``. No-op where there are none."""
        return None

    def _check_length(self, rel: str, start: int, n: int, got: int) -> None:
        """TruncatedObjectError naming the byte range if a read of ``n`` bytes got only ``got``."""
        if got < n:
            raise TruncatedObjectError(
                f"{self.uri_of(rel)}: bytes [{start}, {start + n}) requested, object ends at {start + got}"
            )
