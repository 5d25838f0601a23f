"""``ckpt.read``: a checkpoint back as the nested structure it was saved from, like ``torch.load``.

No target is needed (eval scripts, notebooks, ``CheckpointIO.load_checkpoint``): every tensor
comes back whole (global) and plain, whatever sharding saved it. ``lazy=True`` returns
mappings that read a tensor only when it is accessed, for state larger than RAM.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from . import refs, structure
from .describe import describe_tensor
from .fetch import check_holds
from .format import Manifest
from .load import read_tensors
from .locate import open_checkpoint
from .options import LoadOptions
from .storage import Storage


def read(
    uri: str,
    keys: str | Iterable[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    lazy: bool = False,
    options: LoadOptions | None = None,
) -> Any:
    """The saved state dict (or the sub-trees ``keys`` name, by flat-key prefix, e.g. "model"
    or "optim.state"), with full plain tensors on ``device``; ``dtype`` casts floating-point
    tensors. A run root reads the checkpoint its ``latest`` marker names.

    ``lazy=True`` returns read-only mappings (lists and tuples as sequences) that read each
    tensor from storage when it is accessed and keep nothing. Every byte is verified.
    """
    options = options or LoadOptions()
    storage, manifest = open_checkpoint(uri, options.storage_options)
    reader = _Reader(storage, manifest, options, torch.device(device), dtype)
    select = structure.selector(keys)
    tree = manifest.tree()
    if lazy:
        return _lazy(tree, "", reader, select)
    wanted = [k for k in structure.leaves(tree) if select(k)]
    tensors = reader.read_many([k for k in wanted if k in manifest.tensors])
    built = structure.build(tree, lambda k: tensors[k] if k in tensors else manifest.values[k], select)
    if built is structure.MISSING:
        raise KeyError(f"{storage.uri}: nothing stored under {keys!r}")
    return built


class _Reader:
    def __init__(
        self, storage: Storage, manifest: Manifest, options: LoadOptions, device: torch.device, dtype
    ) -> None:
        self.storage, self.manifest, self.options, self.device, self.dtype = storage, manifest, options, device, dtype
        self._sizes: dict[str, int] = {}

    def read_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read whole tensors in one planned pass (reads coalesced across keys)."""
        for k in keys:  # memory only for what the objects really hold, never for a manifest's claim
            check_holds(refs.reading(self.storage, self.manifest), self.manifest.tensors[k].chunks, self._sizes)
        out = {k: torch.empty(self.manifest.tensors[k].shape, dtype=self.manifest.tensors[k].dtype) for k in keys}
        read_tensors(self.storage, self.manifest, {k: describe_tensor(k, t) for k, t in out.items()}, self.options)
        return {k: self._place(t) for k, t in out.items()}

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
        return t.to(self.device, dtype)


def _lazy(node: Any, prefix: str, reader: _Reader, select) -> Any:
    built = structure.build(node, lambda k: None, select, prefix)  # only to know what is selected
    if built is structure.MISSING:
        raise KeyError(f"{reader.storage.uri}: nothing stored under the keys asked for")
    return _wrap(node, prefix, reader, select)


def _wrap(node: Any, prefix: str, reader: _Reader, select) -> Any:
    if node is None:
        if prefix in reader.manifest.tensors:
            return reader.read_many([prefix])[prefix]
        return reader.manifest.values[prefix]
    kept = []
    for k, child in structure.children(node):
        key = structure.join(prefix, k)
        if structure.build(child, lambda _: None, select, key) is not structure.MISSING:
            kept.append((k, child, key))
    if structure.kind(node) == "dict":
        return LazyDict({k: (child, key) for k, child, key in kept}, reader, select)
    return LazySequence([(child, key) for _, child, key in kept], reader, select)


class LazyDict(Mapping):
    """A saved dict whose tensors are read from storage on each access (nothing is cached)."""

    def __init__(self, children: dict[Any, tuple[Any, str]], reader: _Reader, select) -> None:
        self._children, self._reader, self._select = children, reader, select

    def __getitem__(self, k: Any) -> Any:
        child, key = self._children[k]
        return _wrap(child, key, self._reader, self._select)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._children)

    def __len__(self) -> int:
        return len(self._children)

    def __repr__(self) -> str:
        return f"LazyDict({list(self._children)!r})"


class LazySequence(Sequence):
    """A saved list or tuple whose tensors are read from storage on each access."""

    def __init__(self, children: list[tuple[Any, str]], reader: _Reader, select) -> None:
        self._children, self._reader, self._select = children, reader, select

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        child, key = self._children[i]
        return _wrap(child, key, self._reader, self._select)

    def __len__(self) -> int:
        return len(self._children)

    def __repr__(self) -> str:
        return f"LazySequence(<{len(self._children)} items>)"
