"""Damage a stored checkpoint the way bad disks and networks do, for the tests that must catch it."""

from __future__ import annotations


def flip_bits(path: str, offset: int, mask: int) -> None:
    """XOR the byte at ``offset`` of the file at ``path`` with ``mask``, in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))
