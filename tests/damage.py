"""Damage a stored checkpoint the way bad disks and networks do, for the tests that must catch it."""

from __future__ import annotations

import fsspec


def flip_bits(path: str, offset: int, mask: int) -> None:
    """XOR the byte at ``offset`` of the file at ``path`` (a local path or an fsspec URL) with ``mask``.

    A local file is changed in place; other filesystems have no in-place write, so the object is
    rewritten whole with that one byte changed.
    """
    if "://" not in path:
        with open(path, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ mask]))
        return
    fs, p = fsspec.core.url_to_fs(path)
    raw = bytearray(fs.cat_file(p))
    raw[offset] ^= mask
    fs.pipe_file(p, bytes(raw))
