"""Non-tensor values <-> standard JSON: typed tags for what JSON lacks, never pickle.

Training states hold more than JSON can say: tuples (``random.getstate()`` must come back
as tuples for ``random.setstate``), non-finite floats, numpy arrays and RNG states,
``torch.Generator``, ``argparse.Namespace``, ``pathlib`` paths, dicts with int keys. Each
such value is written as a JSON object tagged ``{"$ckpt": <type>, ...}`` (the table is in
docs/FORMAT.md, "Version 2"), so every file ckpt writes is standard JSON (no ``NaN`` /
``Infinity`` tokens) and decoding builds only the fixed set of types below: nothing named by
the file is imported or called. numpy and torch are imported only when a value needs them,
so reading a manifest stays cheap for the CLI.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from argparse import Namespace
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any

from .errors import CheckpointFormatError, UnsupportedValueError

TAG = "$ckpt"
NUMPY_BIT_GENERATORS = ("MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64")
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_SUPPORTED = (
    "tensors, None, bool, int, float, str, bytes, lists, tuples, sets, dicts, argparse.Namespace, pathlib paths, "
    "numpy arrays, scalars and RNGs, torch.Generator, torch.dtype, torch.device"
)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _float(v: float) -> Any:
    if math.isfinite(v):
        return v
    return {TAG: "float", "value": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}


def encode(value: Any, key: str, problems: list[str]) -> Any:
    """``value`` as standard JSON; each value that cannot be stored adds a line naming its key."""
    if value is None or type(value) in (bool, str):
        return value
    module = type(value).__module__.split(".")[0]
    if module == "numpy":  # before float: np.float64 is a float, and must come back as one
        return _encode_numpy(value, key, problems)
    if isinstance(value, str):  # a str enum, say: its text
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _float(float(value))
    if isinstance(value, list):
        return [encode(x, f"{key}.{i}", problems) for i, x in enumerate(value)]
    if isinstance(value, tuple):
        return {TAG: "tuple", "items": [encode(x, f"{key}.{i}", problems) for i, x in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and TAG not in value:
            return {k: encode(x, f"{key}.{k}", problems) for k, x in value.items()}
        items = [[encode(k, f"{key}.<key>", problems), encode(x, f"{key}.{k}", problems)] for k, x in value.items()]
        return {TAG: "dict", "items": items}
    if isinstance(value, (bytes, bytearray)):
        return {TAG: "bytes", "base64": _b64(bytes(value))}
    if isinstance(value, (set, frozenset)):
        kind = "set" if isinstance(value, set) else "frozenset"
        return {TAG: kind, "items": [encode(x, f"{key}.<item>", problems) for x in value]}
    if isinstance(value, Namespace):
        return {TAG: "namespace", "items": encode(vars(value), key, problems)}
    if isinstance(value, PurePath):
        flavour = "windows" if isinstance(value, PureWindowsPath) else "posix"
        return {TAG: "path", "path": str(value), "flavour": flavour, "pure": not isinstance(value, Path)}
    if module == "torch":
        found = _encode_torch(value)
        if found is not None:
            return found
    kind = "a tensor inside a value" if module == "torch" else f"{type(value).__module__}.{type(value).__qualname__}"
    problems.append(f"{key}: {kind} cannot be saved without pickle")
    return None


def _encode_numpy(value: Any, key: str, problems: list[str]) -> Any:
    np = sys.modules["numpy"]
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.hasobject or value.dtype.fields is not None:
            problems.append(f"{key}: numpy arrays of dtype {value.dtype} cannot be saved without pickle")
            return None
        arr = np.asarray(value)  # tobytes() is row-major whatever the memory order
        kind = "ndarray" if isinstance(value, np.ndarray) else "numpy.scalar"
        return {TAG: kind, "dtype": arr.dtype.str, "shape": list(arr.shape), "base64": _b64(arr.tobytes())}
    if isinstance(value, np.random.Generator):
        return {TAG: "numpy.Generator", "state": encode(value.bit_generator.state, key, problems)}
    if isinstance(value, np.random.RandomState):
        return {TAG: "numpy.RandomState", "state": encode(value.get_state(), key, problems)}
    problems.append(f"{key}: numpy.{type(value).__qualname__} cannot be saved without pickle")
    return None


def _encode_torch(value: Any) -> Any:
    torch = sys.modules["torch"]
    if isinstance(value, torch.Generator):
        state = value.get_state()
        return {TAG: "torch.Generator", "device": str(value.device), "state": _b64(state.numpy().tobytes())}
    if isinstance(value, torch.dtype):
        return {TAG: "torch.dtype", "name": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {TAG: "torch.device", "device": str(value)}
    return None


def encode_checked(value: Any, key: str) -> Any:
    """``encode``, raising one ``UnsupportedValueError`` that lists every bad value."""
    problems: list[str] = []
    out = encode(value, key, problems)
    if problems:
        raise unsupported(problems)
    return out


def unsupported(problems: list[str]) -> UnsupportedValueError:
    head = f"{len(problems)} problem(s) in the state dict (nothing is pickled; values may be {_SUPPORTED})"
    return UnsupportedValueError(head + ":\n  " + "\n  ".join(problems))


def decode(obj: Any) -> Any:
    """The Python value ``encode`` was given (dict subclasses come back as ``dict``)."""
    if isinstance(obj, list):
        return [decode(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    tag = obj.get(TAG)
    if tag is None:
        return {k: decode(x) for k, x in obj.items()}
    try:
        return _decode_tagged(tag, obj)
    except CheckpointFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointFormatError(f"malformed {tag!r} value ({type(e).__name__}: {e})") from None


def _decode_tagged(tag: str, obj: dict) -> Any:
    if tag == "float":
        return _FLOATS[obj["value"]]
    if tag == "tuple":
        return tuple(decode(x) for x in obj["items"])
    if tag == "dict":
        return {_hashable(decode(k)): decode(x) for k, x in obj["items"]}
    if tag == "set":
        return {_hashable(decode(x)) for x in obj["items"]}
    if tag == "frozenset":
        return frozenset(_hashable(decode(x)) for x in obj["items"])
    if tag == "bytes":
        return base64.b64decode(obj["base64"], validate=True)
    if tag == "namespace":
        return Namespace(**decode(obj["items"]))
    if tag == "path":
        pure = {"posix": PurePosixPath, "windows": PureWindowsPath}[obj["flavour"]]
        native = isinstance(Path(), PureWindowsPath) == (pure is PureWindowsPath)
        return Path(obj["path"]) if native and not obj["pure"] else pure(obj["path"])
    if tag in ("ndarray", "numpy.scalar", "numpy.Generator", "numpy.RandomState"):
        return _decode_numpy(tag, obj)
    if tag in ("torch.Generator", "torch.dtype", "torch.device"):
        return _decode_torch(tag, obj)
    raise CheckpointFormatError(f"unknown value type {tag!r} (written by a newer ckpt?)")


def _hashable(v: Any) -> Any:
    hash(v)  # a list where a key was: TypeError, reported as a malformed value
    return v


def _decode_numpy(tag: str, obj: dict) -> Any:
    import numpy as np

    if tag in ("ndarray", "numpy.scalar"):
        dtype = np.dtype(obj["dtype"])
        if dtype.hasobject or dtype.fields is not None:
            raise ValueError(f"dtype {dtype} is not a plain numeric dtype")
        shape = tuple(int(n) for n in obj["shape"])
        arr = np.frombuffer(base64.b64decode(obj["base64"], validate=True), dtype=dtype).reshape(shape).copy()
        return arr if tag == "ndarray" else arr[()]
    state = decode(obj["state"])
    if tag == "numpy.RandomState":
        rs = np.random.RandomState()
        rs.set_state(state)
        return rs
    name = state["bit_generator"]
    if name not in NUMPY_BIT_GENERATORS:
        raise ValueError(f"unknown numpy bit generator {name!r}")
    bit_generator = getattr(np.random, name)()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def _decode_torch(tag: str, obj: dict) -> Any:
    import torch

    if tag == "torch.dtype":
        dtype = getattr(torch, obj["name"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown torch dtype {obj['name']!r}")
        return dtype
    if tag == "torch.device":
        return torch.device(obj["device"])
    raw = bytearray(base64.b64decode(obj["state"], validate=True))
    gen = torch.Generator(device=obj["device"])
    gen.set_state(torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8))
    return gen


def dumps(obj: Any, **kwargs: Any) -> str:
    """Standard JSON of an already-encoded object: a non-finite float here is a bug, not a token."""
    return json.dumps(obj, allow_nan=False, **kwargs)


def to_json_text(value: Any, **kwargs: Any) -> str:
    """Any value as standard JSON text, for display (``--json`` output): unsupported parts as null."""
    return dumps(encode(value, "", []), **kwargs)
