"""Where a tool writes: refuse to clobber, and leave nothing behind on failure.

Every writing tool checks its destination before it reads a byte of input it
might fail on, and removes what it wrote if it fails, so an error leaves the
destination as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import CheckpointError, CheckpointExistsError
from ..format import DATA_DIR, MANIFEST, STAGING_DIR
from ..storage import open_storage


class DestinationError(CheckpointError):
    """The destination holds something a tool will not write over."""


def check_destination(uri: str, ckpt_overwrite: bool = False, can_overwrite: bool = True) -> bool:
    """Raise unless ``uri`` is absent or an empty directory, or (with ``ckpt_overwrite``)
    a committed ckpt checkpoint to be replaced atomically. ``can_overwrite`` says whether
    the tool offers --overwrite at all (for the message). Returns whether ``uri`` exists."""
    storage = open_storage(uri)
    fs, root = storage.fs, storage.root
    if not fs.exists(root):
        return False
    if not fs.isdir(root):
        raise DestinationError(f"{uri}: exists and is a file; remove it or choose another destination")
    names = set(storage.listdir(""))
    if not names:
        return True
    if MANIFEST in names and can_overwrite:
        if ckpt_overwrite:
            return True
        raise CheckpointExistsError(f"{uri}: a committed checkpoint exists; pass --overwrite to replace it")
    if names <= {DATA_DIR, STAGING_DIR}:
        raise DestinationError(f"{uri}: holds an uncommitted checkpoint; run `ckpt gc` on its parent or remove it")
    raise DestinationError(f"{uri}: exists and is not empty; remove it or choose another destination")


@contextmanager
def cleanup_on_failure(uri: str, existed: bool, prefixes: list[str] | None = None) -> Iterator[list[str]]:
    """On an exception, delete ``uri`` if this run created it, else the paths under it
    that start with one of ``prefixes`` (the yielded list may be extended inside the block)."""
    mine = list(prefixes or [])
    try:
        yield mine
    except BaseException:
        storage = open_storage(uri)
        try:
            if not existed:
                storage.delete("", recursive=True)
            else:
                for rel in mine:
                    for path in storage.fs.glob(storage.path(rel) + "*"):
                        storage.fs.rm(path, recursive=True)
        except Exception:
            pass  # the original error matters more; leftovers are invisible and gc-able
        raise
