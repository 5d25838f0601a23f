"""Byte sizes as people write and read them: ``5GB``, ``64MiB``, ``4096`` <-> bytes.

The one size parser of every command line (``ckpt``, ``ckpt merge``, ``ckpt-server``), so
"5GB" means the same everywhere: SI prefixes are powers of 10 (as on the Hugging Face Hub
and in disk sizes), IEC prefixes powers of 2. A bare prefix ("5G") is refused rather than
guessed, since tools disagree on it. No torch, no I/O.
"""

from __future__ import annotations

import argparse
import re
from fractions import Fraction

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgtp])(i?))?(b?)\s*", re.IGNORECASE)
_POWER = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_EXAMPLES = "e.g. 5GB = 5*10^9, 64MiB = 64*2^20, 4096 = 4096 bytes"


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``5GB`` = 5*10^9, ``5GiB`` = 5*2^30, ``4096`` = 4096, ``1.5KiB`` = 1536
    (case-insensitive; k, M, G, T, P). Usable as an argparse ``type=``: anything else, a bare
    prefix, a fraction of a byte or a size that is not positive raises ``ArgumentTypeError``
    saying why."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size ({_EXAMPLES})")
    number, prefix, binary, b = m.groups()
    if prefix and not (binary or b):
        n, p, e = number, prefix.upper(), _POWER[prefix.lower()]
        hint = f"write {n}{p}B ({n}*10^{3 * e}) or {n}{p}iB ({n}*2^{10 * e})"
        raise argparse.ArgumentTypeError(f"{text!r} is ambiguous: {hint}")
    scale = 1
    if prefix:
        scale = 1024 ** _POWER[prefix.lower()] if binary else 1000 ** _POWER[prefix.lower()]
    n = Fraction(number) * scale
    if n.denominator != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes")
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be positive")
    return int(n)


def format_size(n: float) -> str:
    """``n`` bytes for people: ``512 B``, ``1.5 KiB``, ..., ``3.0 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
