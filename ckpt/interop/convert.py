"""Any :class:`Source` -> a checkpoint in this library's format, streaming.

Small tensors are packed into shared objects; a tensor of ``pack_bytes`` or
more is streamed chunk by chunk into its own object, so memory is one chunk
(DCP sources: one tensor). Nothing is visible until the final commit, and a
failure removes what was written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..format import DATA_DIR, STAGING_DIR, Manifest
from ..options import SaveOptions
from ..writer import CheckpointWriter
from .destination import check_destination, cleanup_on_failure
from .source import Source


def convert(
    source: Source,
    dst: str,
    options: SaveOptions | None = None,
    progress: Callable[[int], None] | None = None,
    metadata: dict[str, Any] | None = None,
    pack_bytes: int = 64 << 20,
) -> Manifest:
    """Write every tensor and value of ``source`` to a new checkpoint at ``dst``.

    Step, metrics and metadata of the source are kept; ``metadata`` is merged
    over them. With ``options.overwrite`` a committed checkpoint at ``dst`` is
    replaced atomically; otherwise ``dst`` must be absent or empty.
    """
    options = options or SaveOptions()
    existed = check_destination(dst, ckpt_overwrite=options.overwrite)
    info = source.info()
    with cleanup_on_failure(dst, existed) as mine:
        writer = CheckpointWriter(dst, options, pack_bytes=pack_bytes)
        mine += [f"{DATA_DIR}/{writer.save_id}-", f"{STAGING_DIR}/{writer.save_id}"]
        for key, t in source.tensors().items():
            if t.nbytes < pack_bytes:
                writer.write_tensor(key, source.read(key), layout=t.layout)
                if progress:
                    progress(t.nbytes)
                continue
            with writer.tensor_stream(key, t.shape, t.dtype, layout=t.layout) as stream:
                for box in stream.boxes:
                    stream.send(source.read(key, box))
                    if progress:
                        progress(box.numel * t.dtype.itemsize)
        for key, value in source.values().items():
            writer.set_value(key, value)
        return writer.commit(
            step=info.step,
            metrics=info.metrics,
            metadata={**info.metadata, **(metadata or {})},
            structure=info.structure,
        )
