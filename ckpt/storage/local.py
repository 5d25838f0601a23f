"""The local-disk backend: durability by fsync, atomicity by rename, reads by preadv and mmap.

Writes are fsynced before they count; an atomic put writes a temp file,
fsyncs it, renames it into place and fsyncs the directory; a conditional put
links the fsynced temp file to its name, which fails if the name exists.
Reads go straight into the caller's buffers (``preadv``) or are mapped from
the page cache (``map_range``). A checkpoint's reader ``confine()`` s the storage:
then objects are read only from regular files reached without following a symlink
inside the location (``UnsafeObjectError`` otherwise), since a manifest names them
and a planted link, FIFO or directory must not make a reader read outside the
checkpoint or block. Local calls are not retried. Built on ``os`` alone: listing,
``ckpt info`` and loads from disk never import fsspec (tools that walk a location
through fsspec get its view of the same directory, ``fs``, on first use).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import mmap
import os
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import StorageFullError, TruncatedObjectError, UnsafeObjectError
from .base import Storage, uri_scheme

if TYPE_CHECKING:
    from fsspec.implementations.local import LocalFileSystem

_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) (not in the os module), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def full_disk_named(where: str) -> Iterator[None]:
    """Turn a full disk or quota (a bare OSError) into StorageFullError naming ``where``."""
    try:
        yield
    except OSError as e:
        if e.errno in _FULL and not isinstance(e, StorageFullError):
            raise StorageFullError(e.errno, f"{where}: no space left on the device ({e.strerror or e})") from e
        raise


def is_local(uri: str) -> bool:
    """Whether ``uri`` is a path or ``file://`` URI (what fsspec opens as its local filesystem)."""
    return "::" not in uri and uri_scheme(uri) in (None, "file", "local")


def local_root(uri: str) -> str:
    """The absolute path of a local ``uri``, spelt as fsspec spells it (``fs`` walks the same paths)."""
    path = uri
    for prefix in ("file://", "local://", "file:", "local:"):
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    if path.startswith("~"):
        path = os.path.expanduser(path)
    elif not path.startswith("/"):
        path = "" if path == "." else path.removeprefix("./")
        path = f"{os.getcwd()}/{path}"
    return path.rstrip("/") or "/"


class LocalStorage(Storage):
    """A directory on a local (or locally mounted) file system; ``root`` is its absolute path."""

    def __init__(self, uri: str, **storage_options: Any) -> None:
        if not is_local(uri):
            raise ValueError(f"{uri}: not a local path (open it with ckpt.storage.open_storage)")
        if "retry" in storage_options:  # never used here, kept JSON-able: the daemon reopens with the options
            from .retry import RetryPolicy  # (on first need: it imports asyncio)

            storage_options = {**storage_options, "retry": asdict(RetryPolicy.of(storage_options["retry"]))}
        self.uri = uri
        self.options = storage_options
        self.root = local_root(uri)
        self.confined = False  # see confine()

    @property
    def fs(self) -> LocalFileSystem:
        """fsspec's view of this directory, for tools that walk any backend's location (gc, interop)."""
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem()

    def path(self, rel: str) -> str:
        """The object's absolute path."""
        return f"{self.root}/{rel}" if rel else self.root

    def confine(self) -> LocalStorage:
        confined = copy.copy(self)
        confined.confined = True
        return confined

    @property
    def is_remote(self) -> bool:
        return False

    @property
    def supports_mapping(self) -> bool:
        return True

    @property
    def supports_put_if_absent(self) -> bool:
        return True

    def local_path(self, rel: str) -> str:
        return self.path(rel)

    @contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        """A failed write removes its partial file (a full disk gets its space back); a full
        disk or quota raises StorageFullError naming the object."""
        path = self.path(rel)
        with full_disk_named(self.uri_of(rel)):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                with open(path, "wb", buffering=0) as f:
                    yield f
                    os.fsync(f.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise

    def start_writeback(self, f: BinaryIO, start: int, stop: int) -> None:
        """Start writing bytes [start, stop) to disk now.

        Without it the kernel holds a checkpoint's pages dirty until the final
        fsync, which then waits for all of them after the CPU work is done;
        started early, the disk works while the rest is still being produced.
        Durability still comes from the fsync. No-op where unsupported.
        """
        if _sync_file_range is None or stop <= start:
            return
        try:
            fd = f.fileno()
        except (AttributeError, OSError, ValueError):
            return
        _sync_file_range(fd, start, stop - start, _SYNC_FILE_RANGE_WRITE)

    def put_atomic(self, rel: str, data: bytes) -> None:
        self._publish(rel, data, os.replace)

    def put_transient(self, rel: str, data: bytes) -> None:
        """A temp file renamed into place, no fsync: seen whole, not necessarily after a crash."""
        path = self.path(rel)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with full_disk_named(self.uri_of(rel)):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def put_if_absent(self, rel: str, data: bytes) -> bool:
        """The fsynced temp file is hard-linked to ``rel``: link(2) fails if the name exists,
        so the object appears whole and only the first of concurrent callers creates it."""
        try:
            self._publish(rel, data, os.link)
        except FileExistsError:
            return False
        return True

    def _publish(self, rel: str, data: bytes, place: Callable[[str, str], None]) -> None:
        """Write ``data`` aside durably, ``place(tmp, path)`` it, fsync the directory."""
        path = self.path(rel)
        directory = os.path.dirname(path)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with full_disk_named(self.uri_of(rel)):
            os.makedirs(directory, exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                place(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def open_regular(self, rel: str) -> int:
        """A read-only descriptor of the regular file ``rel``: each component below the location
        is opened without following a symlink (O_NOFOLLOW), the file without blocking on a FIFO
        (O_NONBLOCK), and anything but a regular file is refused (fstat). A missing one raises
        FileNotFoundError; a link, FIFO, device or directory UnsafeObjectError."""
        *dirs, name = rel.split("/")
        fd = os.open(self.root or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the location may be a link
        try:
            for part in dirs:
                step = self._open_at(fd, part, rel, os.O_DIRECTORY)
                os.close(fd)
                fd = step
            found = self._open_at(fd, name, rel, os.O_NONBLOCK)
        finally:
            os.close(fd)
        mode = os.fstat(found).st_mode
        if not stat.S_ISREG(mode):
            os.close(found)
            kind = "directory" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "special file"
            raise UnsafeObjectError(f"{self.uri_of(rel)}: a {kind}, not a regular file; not read")
        return found

    def _open_at(self, fd: int, part: str, rel: str, flags: int) -> int:
        try:
            return os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, dir_fd=fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                try:
                    link = stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
                except OSError:
                    link = False
                if link:
                    raise UnsafeObjectError(f"{self.uri_of(rel)}: {part} is a symbolic link, not followed") from None
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise FileNotFoundError(errno.ENOENT, f"{self.uri_of(rel)}: no such object") from None
            raise

    def _open(self, rel: str) -> int:
        return self.open_regular(rel) if self.confined else os.open(self.path(rel), os.O_RDONLY | os.O_CLOEXEC)

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.path(rel))

    def is_dir(self, rel: str) -> bool:
        return os.path.isdir(self.path(rel))

    def size(self, rel: str) -> int:
        if not self.confined:
            return os.stat(self.path(rel)).st_size  # a stat, not an open: a FIFO does not block it
        fd = self.open_regular(rel)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def read_bytes(self, rel: str) -> bytes:
        with os.fdopen(self._open(rel), "rb") as f:
            return f.read()

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        with os.fdopen(self._open(rel), "rb") as f:
            f.seek(start)
            return f.read(max(0, stop - start))

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, rel: str, recursive: bool = False) -> None:
        """A directory goes only with ``recursive``; a symbolic link is removed, never followed."""
        path = self.path(rel)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                if not recursive:
                    raise ValueError(f"{self.uri_of(rel)}: a directory (delete it with recursive=True)")
                shutil.rmtree(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            pass

    def remove_empty_dir(self, rel: str) -> None:
        """rmdir(2): the kernel refuses a directory that is not empty."""
        try:
            os.rmdir(self.path(rel))
        except OSError:  # gone, or not empty: someone else's files stay
            pass

    def read_into_many(self, rel: str, start: int, bufs: list[memoryview]) -> None:
        """Read straight into the buffers (no intermediate copy)."""
        n = sum(len(b) for b in bufs)
        got = 0
        fd = self._open(rel)
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
        self._check_length(rel, start, n, got)

    def map_range(self, rel: str, start: int, stop: int) -> memoryview:
        """A private (copy-on-write) mapping of the page cache: readers may view it as a
        writable tensor without touching the file. Objects are immutable once written; a
        short file raises TruncatedObjectError here, never SIGBUS later."""
        fd = self._open(rel)
        try:
            size = os.fstat(fd).st_size
            if stop > size:
                raise TruncatedObjectError(
                    f"{self.uri_of(rel)}: bytes [{start}, {stop}) requested, object ends at {size}"
                )
            if stop <= start:
                return memoryview(bytearray(0))
            base = start - start % mmap.ALLOCATIONGRANULARITY
            m = mmap.mmap(fd, stop - base, access=mmap.ACCESS_COPY, offset=base)
        finally:
            os.close(fd)
        return memoryview(m)[start - base :]
