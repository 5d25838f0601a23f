"""What a transformers model directory says beside its weights: tied weights, expected keys, side files.

transformers stores a tied weight once (``lm_head.weight`` is not in the file when
``tie_word_embeddings`` ties it to ``model.embed_tokens.weight``) and re-ties it on load from
``config.json``; which names are tied is a property of the model class, not of the config
alone. :func:`model_keys` asks transformers itself: the class ``config.json`` names in
``architectures`` is built on the meta device (no memory, no weights) and its
``all_tied_weights_keys`` and state-dict keys are read. Only classes transformers defines are
built: a config's ``auto_map`` (code shipped beside the weights) is never run. transformers is
imported only here, and only when a model directory is involved.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import CheckpointError

CONFIG = "config.json"
# Weight files a model directory may hold; everything else in it (config, tokenizer,
# generation config, chat template, preprocessor) travels with an export.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".index.json")


class ModelConfigError(CheckpointError):
    """A model directory whose config does not say which transformers model it is."""


class TiedWeightsError(CheckpointError):
    """Tied weights that differ in the checkpoint, so storing one of them would change the model."""


@dataclass(frozen=True)
class ModelKeys:
    """The keys a transformers model's ``from_pretrained`` expects, and which of them it re-ties."""

    architecture: str
    tied: dict[str, str]  # target -> source: the target is not stored, it is the source's tensor
    expected: frozenset[str]  # state-dict keys less the tied targets: exactly what a saved file holds


def model_keys(config_dir: str) -> ModelKeys:
    """The keys of the model ``config_dir/config.json`` describes, from transformers."""
    path = os.path.join(config_dir, CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ModelConfigError(f"{path}: no such file (a model directory holds its config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
    archs = raw.get("architectures") if isinstance(raw, dict) else None
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ModelConfigError(
            f"{path}: names no \"architectures\" (e.g. [\"LlamaForCausalLM\"]), so which weights the model ties "
            "is unknown; add it, or give the ties with --tie TARGET=SOURCE"
        )
    try:
        import torch
        import transformers
    except ImportError:
        raise ModelConfigError(
            f"{path}: reading which weights {archs[0]} ties needs transformers (pip install transformers), "
            "or give them with --tie TARGET=SOURCE"
        ) from None
    cls = getattr(transformers, archs[0], None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise ModelConfigError(f"{path}: {archs[0]!r} is not a model class transformers defines")
    try:
        config = transformers.AutoConfig.from_pretrained(config_dir, local_files_only=True)
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:  # a config this transformers cannot build: say so, naming the file
        raise ModelConfigError(f"{path}: transformers cannot build {archs[0]} from it ({type(e).__name__}: {e})") from e
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    expected = frozenset(k for k in model.state_dict() if k not in tied)
    return ModelKeys(archs[0], tied, expected)


def parse_ties(specs: list[str]) -> dict[str, str]:
    """``["lm_head.weight=model.embed_tokens.weight", ...]`` -> ``{target: source}``."""
    ties: dict[str, str] = {}
    for spec in specs:
        target, sep, source = spec.partition("=")
        if not sep or not target or not source or target == source:
            example = "lm_head.weight=model.embed_tokens.weight"
            raise ValueError(f"{spec!r}: a tie is TARGET=SOURCE, two different keys ({example})")
        ties[target] = source
    return ties


def side_files(config_dir: str) -> list[str]:
    """The files of ``config_dir`` an export copies: all but weights and hidden files, not recursing."""
    names = sorted(os.listdir(config_dir))
    if CONFIG not in names:
        raise ModelConfigError(f"{config_dir}: holds no {CONFIG}")
    return [
        n for n in names
        if not n.startswith(".") and not n.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(config_dir, n))
    ]


def tied_for_reading(config_dir: str) -> dict[str, str]:
    """``{target: source}`` for reading a model directory into a state dict that names both, or
    ``{}`` when its config rules ties out or transformers cannot tell (not installed, unknown
    architecture): reading then serves what the files hold, as before."""
    try:
        with open(os.path.join(config_dir, CONFIG), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return {}
    if not _may_tie(raw):
        return {}
    try:
        return model_keys(config_dir).tied
    except ModelConfigError:
        return {}


def _may_tie(config: object) -> bool:
    """Whether a config could tie weights: not when it says ``tie_word_embeddings: false`` and no
    sub-config (``text_config``...) says true; asking transformers costs its import."""
    if not isinstance(config, dict):
        return False
    subs = [v for v in config.values() if isinstance(v, dict)]
    return config.get("tie_word_embeddings", True) is not False or any(
        isinstance(s.get("tie_word_embeddings"), bool) and s["tie_word_embeddings"] for s in subs
    )
