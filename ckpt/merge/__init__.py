"""Checkpoint merging: uniform, explicit weights, EMA, metrics-weighted averaging, LCSC.

``ckpt.merge(sources, output, method=...)`` streams the weighted sum tensor by
tensor and chunk by chunk (memory stays at a few chunks per source), reading
sources saved under any topology, and writes a ckpt checkpoint or HF-style
safetensors. Methods are pluggable: subclass :class:`Method` and decorate it
with :func:`register_method`. See docs/MERGING.md.

Note: ``ckpt.merge`` is the function; import this package's modules as
``from ckpt.merge.methods import ...``.
"""

from .driver import FORMATS, MergeResult, merge
from .errors import EvaluationError, MergeError, SourceMismatchError, WeightError
from .lcsc import LCSC, SearchMethod
from .methods import EMA, MWA, Explicit, MergeSourceInfo, Method, Uniform, method_names, mwa_weights, register_method

__all__ = [
    "EMA",
    "FORMATS",
    "LCSC",
    "MWA",
    "EvaluationError",
    "Explicit",
    "MergeError",
    "MergeResult",
    "MergeSourceInfo",
    "Method",
    "SearchMethod",
    "SourceMismatchError",
    "Uniform",
    "WeightError",
    "merge",
    "method_names",
    "mwa_weights",
    "register_method",
]
