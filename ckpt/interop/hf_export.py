"""Export for ``from_pretrained``: a sub-tree under transformers' names, tied copies stored once,
the model directory's config and tokenizer files beside the shards.

A training checkpoint saved as ``ckpt.save({"model": model.state_dict(), "optim": ...})`` holds
``model.lm_head.weight`` and ``model.model.embed_tokens.weight`` as two equal tensors when the
model ties them (``state_dict`` names a tied parameter twice). transformers' own files hold the
tie's source only and re-tie from ``config.json``; so does this export, after checking the two
are bitwise equal (if they are not, the model was not tied and dropping one would change it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..errors import StateDictMismatchError
from ..storage import open_storage
from .hf_model import ModelKeys, TiedWeightsError, model_keys, side_files
from .source import Source, slabs
from .view import SourceView, select


@dataclass
class HfPlan:
    """What an export to a model directory will write, and how it fits the model."""

    tied: dict[str, str] = field(default_factory=dict)  # target left out -> the source stored for it
    model: ModelKeys | None = None
    side_files: list[str] = field(default_factory=list)  # copied from config_dir
    missing: list[str] = field(default_factory=list)  # the model expects them, the export lacks them
    unexpected: list[str] = field(default_factory=list)  # exported, not a key of the model


def hf_view(
    source: Source,
    only: str | None = None,
    strip_prefix: str | None = None,
    config_dir: str | None = None,
    ties: dict[str, str] | None = None,
    check_keys: bool = True,
    slab_bytes: int = 64 << 20,
) -> tuple[SourceView, HfPlan]:
    """``source`` as the model directory's weights: selected, renamed, tied copies left out.

    ``ties`` (``{target: source}``) overrides what transformers says the model of
    ``config_dir/config.json`` ties; with neither, nothing is tied. Tied tensors that are both
    exported must be bitwise equal (``TiedWeightsError`` otherwise). With ``check_keys``, keys
    the model would report missing or unexpected raise ``StateDictMismatchError`` before
    anything is written."""
    view = select(source, only, strip_prefix)
    plan = HfPlan()
    if config_dir is not None:
        plan.side_files = side_files(config_dir)
        if ties is None:
            plan.model = model_keys(config_dir)
    tensors = view.tensors()
    for target, src in (ties if ties is not None else plan.model.tied if plan.model else {}).items():
        if target in tensors and src in tensors:
            _check_tied(view, target, src, slab_bytes)
            plan.tied[target] = src
    view = view.without(plan.tied)
    if plan.model is not None:
        kept = set(view.tensors())
        plan.missing = sorted(plan.model.expected - kept)
        plan.unexpected = sorted(kept - plan.model.expected)
        if check_keys and (plan.missing or plan.unexpected):
            raise StateDictMismatchError(
                [f"{k}: {plan.model.architecture} expects it, the export lacks it" for k in plan.missing]
                + [f"{k}: exported, not a key of {plan.model.architecture}" for k in plan.unexpected],
                f"{view.uri}: the export would not load into {plan.model.architecture} without "
                f"{len(plan.missing)} missing and {len(plan.unexpected)} unexpected key(s)",
                _prefix_hint(plan.missing, plan.unexpected, strip_prefix),
                plan.missing,
                plan.unexpected,
            )
    return view, plan


def _prefix_hint(missing: list[str], unexpected: list[str], strip_prefix: str | None) -> str:
    """``--strip-prefix`` that would turn most unexpected keys into missing ones, if any."""
    want = set(missing)
    for prefix in sorted({k.split(".", 1)[0] + "." for k in unexpected if "." in k}):
        if 2 * sum(k[len(prefix) :] in want for k in unexpected if k.startswith(prefix)) >= max(len(want), 1):
            return f"--strip-prefix {strip_prefix or ''}{prefix}"
    return "--only to pick the model's sub-tree, --strip-prefix to drop what precedes its keys" if want else ""


def _check_tied(view: SourceView, target: str, source: str, slab_bytes: int) -> None:
    a, b = view.tensors()[target], view.tensors()[source]
    names = f"{view.stored_name(target)} and {view.stored_name(source)}"
    if (a.shape, a.dtype) != (b.shape, b.dtype):
        raise TiedWeightsError(
            f"{view.uri}: {names} are tied in the model but differ here: "
            f"{tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        )
    for box in slabs(a, slab_bytes):
        x, y = view.read(target, box), view.read(source, box)
        if not torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
            raise TiedWeightsError(
                f"{view.uri}: {names} are tied in the model but hold different values (first in rows "
                f"{box.offsets[0] if box.offsets else 0}..{box.ends[0] if box.ends else 1}); "
                "the checkpoint is not of a tied model: pass --tie to say which weights are tied, or export both"
            )


def copy_side_files(config_dir: str, dst: str, names: list[str]) -> list[str]:
    """Copy ``names`` from the local ``config_dir`` into ``dst`` (any storage); return them."""
    storage = open_storage(dst)
    for name in names:
        with open(os.path.join(config_dir, name), "rb") as f:
            storage.put_atomic(name, f.read())
    return names

