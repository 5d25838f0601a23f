"""Checkpoints in other formats: detect, read (as a :class:`Source`), convert, export.

Formats: this library's own (``manifest.json``), torch DCP directories
(``.metadata``), DeepSpeed checkpoint directories (ZeRO 1/2/3, universal),
Megatron-Core ``torch_dist`` and ByteCheckpoint checkpoints,
Hugging Face safetensors (a file, or shards with an index) and
``torch.save`` files. Nothing here unpickles code.
"""

from __future__ import annotations

from ..errors import CheckpointNotFoundError
from ..format import DATA_DIR, MANIFEST, STAGING_DIR
from ..framing import MAX_HEADER_BYTES
from ..storage import Storage, open_storage
from .dcp import METADATA, DcpSource, export_dcp
from .dcp_foreign import ByteCheckpointSource, MegatronSource, foreign_dcp_format
from .deepspeed import DeepSpeedSource, looks_like_deepspeed
from .hf import INDEX_SUFFIX, SafetensorsSource, export_safetensors
from .source import CkptSource, ForeignFormatError, Source, SourceInfo, TensorInfo, UnknownFormatError
from .torchsave import TorchSaveSource, export_torch, looks_like_torch_save

FORMATS = ("ckpt", "dcp", "deepspeed", "megatron", "bytecheckpoint", "safetensors", "torch")

__all__ = [
    "FORMATS",
    "ByteCheckpointSource",
    "MegatronSource",
    "CkptSource",
    "DcpSource",
    "DeepSpeedSource",
    "ForeignFormatError",
    "SafetensorsSource",
    "Source",
    "SourceInfo",
    "TensorInfo",
    "TorchSaveSource",
    "UnknownFormatError",
    "detect_format",
    "export_dcp",
    "export_safetensors",
    "export_torch",
    "open_source",
]


class UncommittedCheckpointError(CheckpointNotFoundError):
    """A checkpoint directory whose save never committed (data but no manifest)."""


def detect_format(uri: str) -> str:
    """Which format ``uri`` holds, from its names and first bytes (never by unpickling).

    Raises CheckpointNotFoundError when nothing is there, UncommittedCheckpointError
    for an interrupted save, UnknownFormatError otherwise.
    """
    try:
        return _detect(open_storage(uri), uri)
    except CheckpointNotFoundError:
        raise
    except FileNotFoundError:  # deleted between two looks (gc racing a load)
        raise CheckpointNotFoundError(f"{uri}: no such file or directory (deleted while it was read)") from None


def _detect(storage: Storage, uri: str) -> str:
    fs, root = storage.fs, storage.root
    if not fs.exists(root):
        raise CheckpointNotFoundError(f"{uri}: no such file or directory")
    if fs.isdir(root):
        names = set(storage.listdir(""))
        if MANIFEST in names:
            return "ckpt"
        foreign = foreign_dcp_format(storage, names)
        if foreign:
            return foreign
        if METADATA in names:
            return "dcp"
        if looks_like_deepspeed(names):
            return "deepspeed"
        if any(n.endswith(INDEX_SUFFIX) or n.endswith(".safetensors") for n in names):
            return "safetensors"
        if DATA_DIR in names or STAGING_DIR in names:
            raise UncommittedCheckpointError(
                f"{uri}: an uncommitted checkpoint (data but no {MANIFEST}: the save never finished; "
                "`ckpt gc` removes it)"
            )
        raise UnknownFormatError(f"{uri}: {_UNKNOWN}")
    head = storage.read_range("", 0, 16)
    if looks_like_torch_save(head):
        return "torch"
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if 2 <= n <= MAX_HEADER_BYTES and head[8:9] == b"{":
        return "safetensors"
    raise UnknownFormatError(f"{uri}: {_UNKNOWN}")


_UNKNOWN = (
    "not a checkpoint this tool reads (expected a ckpt checkpoint with manifest.json, a DCP directory "
    "with .metadata, a DeepSpeed checkpoint directory (latest, *_model_states.pt), "
    "a .safetensors file or a directory with model.safetensors(.index.json), or a torch.save file)"
)


def open_source(uri: str, fmt: str | None = None, tied: bool = True) -> Source:
    """Open ``uri`` for reading, detecting its format unless ``fmt`` names it. ``tied=False``: an HF
    model directory's tied weights are not served under their second name (no transformers import)."""
    fmt = fmt or detect_format(uri)
    if fmt == "ckpt":
        return CkptSource(uri)
    if fmt == "dcp":
        return DcpSource(uri)
    if fmt == "deepspeed":
        return DeepSpeedSource(uri)
    if fmt == "megatron":
        return MegatronSource(uri)
    if fmt == "bytecheckpoint":
        return ByteCheckpointSource(uri)
    if fmt == "safetensors":
        return SafetensorsSource(uri, tied=tied)
    if fmt == "torch":
        return TorchSaveSource(uri)
    raise UnknownFormatError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
