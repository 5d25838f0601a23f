"""A :class:`Source` under other names: a sub-tree, a stripped prefix, keys dropped or aliased.

``ckpt export --only model --strip-prefix model.`` turns the ``model.model.embed_tokens.weight``
of a training checkpoint into the ``model.embed_tokens.weight`` a transformers model expects;
a tied copy is dropped on export, or served under a second name when a state dict asks for
both. Nothing is copied: every read goes to the underlying source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import CheckpointError
from ..regions import Box
from .source import Source, SourceInfo, TensorInfo


class SelectionError(CheckpointError, ValueError):
    """A sub-tree or prefix that does not fit the checkpoint; names what was asked and what is there."""


class SourceView(Source):
    """``source`` with tensor ``new`` read from ``names[new]``, and ``values`` as its values."""

    def __init__(self, source: Source, names: dict[str, str], values: dict[str, Any]) -> None:
        super().__init__(source.uri)
        self.format = source.format
        self.source = source
        stored = source.tensors()
        self._names = dict(sorted(names.items()))
        self._tensors = {new: stored[old] for new, old in self._names.items()}
        self._values = values

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._tensors)

    def values(self) -> dict[str, Any]:
        return dict(self._values)

    def info(self) -> SourceInfo:
        # the saved nesting names the source's keys, not these
        return dataclasses.replace(self.source.info(), structure=None)

    def stored_name(self, key: str) -> str:
        """The key ``key`` is read from in the underlying source."""
        return self._names[key]

    def read(self, key: str, box: Box | None = None) -> torch.Tensor:
        return self.source.read(self._names[key], box)

    def close(self) -> None:
        self.source.close()

    def without(self, keys: Iterable[str]) -> SourceView:
        """This view less the tensors ``keys``."""
        drop = set(keys)
        return SourceView(self.source, {k: v for k, v in self._names.items() if k not in drop}, self._values)


def select(source: Source, only: str | None = None, strip_prefix: str | None = None) -> SourceView:
    """The tensors and values of ``source`` under ``only`` (a key or a dotted sub-tree: ``model``
    takes ``model.*``), renamed without ``strip_prefix``, which every selected key must start with."""
    tensors, values = source.tensors(), source.values()

    def wanted(key: str) -> bool:
        return not only or key == only or key.startswith(only + ".")

    keys = [k for k in [*tensors, *values] if wanted(k)]
    if not keys and only:
        tops = sorted({k.split(".", 1)[0] for k in [*tensors, *values]})
        raise SelectionError(f"{source.uri}: nothing under {only!r}; its top-level keys are {', '.join(tops)}")
    prefix = strip_prefix or ""
    if prefix:
        bad = [k for k in keys if not k.startswith(prefix) or k == prefix]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise SelectionError(f"{source.uri}: key {bad[0]!r}{more} does not start with {prefix!r}")
    names = {k[len(prefix) :]: k for k in keys if k in tensors}
    kept = {k[len(prefix) :]: values[k] for k in keys if k in values}
    return SourceView(source, names, kept)
