"""Offline resharding: rewrite a checkpoint laid out for a target topology.

``ckpt.load`` already reads any checkpoint into any topology; what a layout
changes is how many requests that takes. Laid out for N ranks sharded along
dim D, rank r's shard of every tensor is stored back to back in one object,
so each rank's load is one contiguous range of one object (coalesced into as
few requests as the read-size cap allows). Tensors without a dim D are
replicated on the target and go, whole, into one shared object.

The shard of a dimension of size n is DTensor's (``torch.chunk``): ranks get
ceil(n / N) rows each, the last ones fewer or none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .format import DATA_DIR, STAGING_DIR, Manifest
from .interop.destination import check_destination, cleanup_on_failure
from .interop.source import Source, TensorInfo
from .options import SaveOptions
from .regions import Box, split_into_chunks
from .writer import CheckpointWriter


@dataclass(frozen=True)
class TargetLayout:
    """``world`` ranks, each holding the ``dim``-th dimension's torch.chunk share."""

    world: int
    dim: int

    def __post_init__(self) -> None:
        if self.world < 1 or self.dim < 0:
            raise ValueError(f"a layout needs world >= 1 and dim >= 0, got world={self.world}, dim={self.dim}")

    def shard(self, shape: tuple[int, ...], rank: int) -> Box | None:
        """Rank's box of a tensor, or None when the tensor is replicated on the target."""
        if len(shape) <= self.dim:
            return None
        n = shape[self.dim]
        step = -(-n // self.world)
        lo = min(rank * step, n)
        hi = min(lo + step, n)
        offsets = tuple(lo if d == self.dim else 0 for d in range(len(shape)))
        sizes = tuple(hi - lo if d == self.dim else s for d, s in enumerate(shape))
        return Box(offsets, sizes)

    def __str__(self) -> str:
        return f"Shard({self.dim}) over {self.world} ranks"


def plan_objects(
    tensors: dict[str, TensorInfo], layout: TargetLayout, chunk_bytes: int
) -> tuple[list[list[tuple[str, Box]]], list[tuple[str, Box]]]:
    """Chunks per target rank (in object order) and the shared object's chunks.

    Within an object, wider dtypes come first so every chunk starts aligned to
    its item size; a rank's chunks are still one contiguous run."""
    order = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    per_rank: list[list[tuple[str, Box]]] = [[] for _ in range(layout.world)]
    shared: list[tuple[str, Box]] = []
    for key in order:
        t = tensors[key]
        if layout.shard(t.shape, 0) is None or t.nbytes == 0:
            shared.extend((key, b) for b in split_into_chunks(Box.full(t.shape), t.dtype.itemsize, chunk_bytes))
            continue
        for r in range(layout.world):
            box = layout.shard(t.shape, r)
            if box is not None and not box.is_empty():
                per_rank[r].extend((key, b) for b in split_into_chunks(box, t.dtype.itemsize, chunk_bytes))
    return per_rank, shared


def reshard_for(
    source: Source,
    dst: str,
    layout: TargetLayout,
    options: SaveOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Write ``source`` to ``dst`` laid out for ``layout`` (one object per target rank)."""
    options = options or SaveOptions()
    existed = check_destination(dst, ckpt_overwrite=options.overwrite)
    tensors = source.tensors()
    per_rank, shared = plan_objects(tensors, layout, options.chunk_bytes)
    info = source.info()
    with cleanup_on_failure(dst, existed) as mine:
        writer = CheckpointWriter(dst, options)
        mine += [f"{DATA_DIR}/{writer.save_id}-", f"{STAGING_DIR}/{writer.save_id}"]
        for key, t in tensors.items():
            kind = "replicated" if layout.shard(t.shape, 0) is None else str(layout)
            writer.declare(key, t.shape, t.dtype, layout=f"{kind} (offline layout)")
        for chunks in [*per_rank, shared]:
            if not chunks:
                continue
            with writer.object_stream(chunks) as stream:
                for key, box in chunks:
                    stream.send(source.read(key, box))
                    if progress:
                        progress(box.numel * tensors[key].dtype.itemsize)
        for key, value in source.values().items():
            writer.set_value(key, value)
        return writer.commit(
            step=info.step,
            metrics=info.metrics,
            metadata=info.metadata,
            structure=info.structure,
            topology={
                "world_size": 1,
                "writer": "offline",
                "laid_out_for": {"world_size": layout.world, "shard_dim": layout.dim},
            },
        )
