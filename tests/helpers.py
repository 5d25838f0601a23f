"""What many test modules need to build data and check it bit for bit: random tensors, byte comparison,
the stored manifest (read, or edited as a writer would), the CLI run in-process.

Imported by name (``from helpers import ...``): conftest puts this folder on ``sys.path``, and spawned
ranks that import a test module find it the same way.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable

import fsspec
import torch

from ckpt.format import MANIFEST, Manifest, seal
from ckpt.reader import CheckpointReader
from ckpt.storage import open_storage


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaN payloads, subnormals, ...), so equality below is really bitwise;
    the same ``seed`` gives the same tensor in every process."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = math.prod(shape) * dtype.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` in row-major order: two NaNs with the same payload compare equal, -0.0 and 0.0 do not."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape and the same bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Fail naming ``what`` (a key) unless ``got`` has the dtype, shape and bytes of ``want``."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.dtype, want.shape)
    assert torch.equal(bits(got), bits(want)), f"{what} differs"


def manifest_of(uri: str) -> Manifest:
    """The committed manifest of the checkpoint at ``uri`` (a path or an fsspec URL), read as ckpt reads it."""
    with fsspec.open(f"{uri}/{MANIFEST}", "rb") as f:
        return Manifest.from_json_bytes(f.read(), uri, open_storage(uri))


def edit_manifest(uri: str, edit: Callable[[dict], object], reseal: bool = True) -> None:
    """Apply ``edit`` to the parsed ``manifest.json`` of the local checkpoint at ``uri`` and write it back;
    with ``reseal`` its ``digest`` is recomputed, as a writer that wrote these contents would have, so
    the reader's later checks are what sees the change (else the digest mismatch does)."""
    path = f"{uri}/{MANIFEST}"
    with open(path, "rb") as f:
        doc = json.load(f)
    edit(doc)
    if reseal:
        doc.pop("digest", None)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(seal(raw) if reseal else raw)


def read_all(uri: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at ``uri``, whole, by key."""
    r = CheckpointReader(uri)
    return {k: r.read(k) for k in r.keys()}


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``ckpt ARGV...`` in this process: its exit code, stdout and stderr."""
    from ckpt.cli import main  # here, not above: ranks that import a test module need no CLI

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()
