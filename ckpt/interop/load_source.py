"""``ckpt.load`` from a checkpoint in another format: each local piece read as a region of the source's global tensor.

A source (DCP, DeepSpeed, Megatron ``torch_dist``, ByteCheckpoint, HF safetensors,
``torch.save``) serves any region of any tensor, so the caller's layout (other
world size, DTensor placements, ``Sharded`` boxes or flat ranges) is filled the
same way a ckpt checkpoint is: the state dict is described into pieces of global
tensors, checked against the source, and each piece is read in row-major slabs of
at most ``slab_bytes`` straight into the target. No conversion step, no copy of
the source; memory is one slab.
"""

from __future__ import annotations

from types import SimpleNamespace

from ..describe import flatten
from ..errors import CheckpointNotFoundError
from ..fetch import target_view
from ..load import _assign, _check_match
from ..options import LoadOptions
from ..regions import split_into_chunks
from .source import Source, SourceInfo

SLAB_BYTES = 64 << 20


def load_source(
    state_dict: dict, source: Source, options: LoadOptions, slab_bytes: int = SLAB_BYTES
) -> SourceInfo:
    """Fill ``state_dict`` in place from ``source``; returns what the source says about itself (step...)."""
    flat = flatten(state_dict, check_values=False)
    stored = SimpleNamespace(tensors=source.tensors(), values=source.values())
    _check_match(source.uri, stored, flat, [], options)  # type: ignore[arg-type]
    for key, entry in flat.tensors.items():
        if key not in stored.tensors:
            continue
        for i, piece in enumerate(entry.pieces):
            for box in split_into_chunks(piece.box, stored.tensors[key].dtype.itemsize, slab_bytes):
                target_view(entry, i, box).copy_(source.read(key, box))
    for key in flat.values:
        if key in stored.values:
            _assign(flat.refs[key], stored.values[key])
    return source.info()


def load_foreign(state_dict: dict, uri: str, options: LoadOptions) -> SourceInfo | None:
    """Load from ``uri`` if it holds a checkpoint in another format; None if it holds none at all."""
    from . import UncommittedCheckpointError, UnknownFormatError, detect_format, open_source

    if options.storage_options:
        # foreign readers open storage with fsspec's defaults: they cannot reach a location that
        # needs these options (an S3 endpoint, credentials), so there is nothing to detect there
        return None
    try:
        fmt = detect_format(uri)
    except (CheckpointNotFoundError, UnknownFormatError, UncommittedCheckpointError):
        return None
    if fmt == "ckpt":
        return None
    with open_source(uri, fmt) as source:
        return load_source(state_dict, source, options)
