"""``ckpt.save``: describe, plan (once per structure), stage, persist, commit."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from . import __version__
from .describe import TensorEntry, flatten, local_view
from .engine import ChunkSpec, StagedChunk, commit, report_failure, wait_committed, write_rank
from .errors import CheckpointExistsError, UnsupportedValueError
from .format import MANIFEST, dtype_name
from .plan import SavePlan, WriteItem, describe_rank, fingerprint, make_save_plan
from .storage import Storage


@dataclass
class SaveOptions:
    """How a save lays out and commits its bytes.

    chunk_bytes: largest stored chunk; bigger tensors are cut into row-major slabs.
    block_bytes: checksum granularity; a partial read verifies whole blocks.
    overwrite: replace a committed checkpoint at the same location (atomically).
    commit_timeout_s: how long the committer waits for the slowest rank.
    storage_options: passed to fsspec (credentials, endpoint_url, ...).
    """

    chunk_bytes: int = 64 << 20
    block_bytes: int = 4 << 20
    overwrite: bool = False
    commit_timeout_s: float = 600.0
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.chunk_bytes <= 0 or self.block_bytes <= 0 or self.block_bytes % 64:
            raise ValueError("chunk_bytes must be positive and block_bytes a positive multiple of 64")


class _Planner:
    """Caches save plans by state-dict structure: collectives only on a new structure."""

    def __init__(self) -> None:
        self._plans: dict[tuple[str, int], SavePlan] = {}
        self._counts: dict[str, int] = {}

    def plan(
        self, tensors: dict[str, TensorEntry] | None, error: str | None, options: SaveOptions, group
    ) -> tuple[SavePlan, str]:
        rank, world = _rank_world(group)
        desc = describe_rank(tensors) if tensors is not None else {}
        fp = fingerprint(desc, world, options.chunk_bytes)
        cache_key = (fp, id(group))
        plan = self._plans.get(cache_key) if error is None else None
        if plan is None:
            token = secrets.token_hex(4)
            mine = {"desc": desc, "error": error, "token": token}
            gathered = [mine]
            if world > 1:
                gathered = [None] * world
                dist.all_gather_object(gathered, mine, group=group)
            errors = [f"rank {r}: {g['error']}" for r, g in enumerate(gathered) if g["error"]]
            if errors:
                raise UnsupportedValueError("save refused:\n  " + "\n  ".join(errors))
            plan = make_save_plan([g["desc"] for g in gathered], rank, options.chunk_bytes, gathered[0]["token"])
            self._plans[cache_key] = plan
        n = self._counts.get(plan.token, 0)
        self._counts[plan.token] = n + 1
        return plan, f"{plan.token}-{n:06d}"


_planner = _Planner()


def _rank_world(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def stage(tensors: dict[str, TensorEntry], items: list[WriteItem]) -> list[StagedChunk]:
    """Host bytes for each chunk this rank writes (borrowed when already CPU and contiguous)."""
    staged = []
    for item in items:
        entry = tensors[item.key]
        piece = entry.pieces[item.piece]
        rel = item.chunk.relative_to(piece.box)
        view = local_view(entry.local.detach(), piece)[rel.slices()]
        host = view.to("cpu").contiguous()
        staged.append(StagedChunk(ChunkSpec(item.key, item.chunk, entry.dtype), host.reshape(-1).view(torch.uint8)))
    return staged


def save(
    state_dict: dict,
    uri: str,
    *,
    step: int | None = None,
    metrics: dict[str, float] | None = None,
    metadata: dict[str, Any] | None = None,
    options: SaveOptions | None = None,
    process_group=None,
) -> str:
    """Save a (sharded) state dict from every rank; return once it is committed.

    Returns the save id recorded in the manifest.
    """
    options = options or SaveOptions()
    storage = Storage(uri, **options.storage_options)
    rank, world = _rank_world(process_group)
    tensors, values, error = None, {}, None
    try:
        if storage.exists(MANIFEST) and not options.overwrite:
            raise CheckpointExistsError(f"{uri}: a committed checkpoint exists; pass SaveOptions(overwrite=True)")
        tensors, values, _ = flatten(state_dict)
    except (UnsupportedValueError, CheckpointExistsError, ValueError, TypeError) as e:
        if world == 1:
            raise
        error = str(e)
    plan, save_id = _planner.plan(tensors, error, options, process_group)
    assert tensors is not None
    try:
        chunks = stage(tensors, plan.items)
        extra = None
        if rank == 0:
            extra = _head(plan, values, step, metrics, metadata, options, world)
        write_rank(storage, save_id, rank, chunks, options.block_bytes, extra)
    except BaseException as e:
        report_failure(storage, save_id, rank, e)
        raise
    if rank == 0:
        commit(storage, save_id, world, options.commit_timeout_s)
    else:
        wait_committed(storage, save_id, rank, options.commit_timeout_s)
    return save_id


def _head(plan: SavePlan, values, step, metrics, metadata, options: SaveOptions, world: int) -> dict[str, Any]:
    """What only the committer's manifest needs, carried in rank 0's index."""
    meshes = sorted({m.layout for m in plan.tensors.values() if m.layout.startswith("DTensor")})
    return {
        "tensors": {
            k: {"shape": list(m.shape), "dtype": dtype_name(m.dtype), "layout": m.layout}
            for k, m in plan.tensors.items()
        },
        "values": values,
        "block_bytes": options.block_bytes,
        "step": step,
        "metrics": dict(metrics or {}),
        "metadata": dict(metadata or {}),
        "topology": {
            "world_size": world,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "dtensor_layouts": meshes,
            "bytes_written_per_rank": plan.bytes_per_rank,
        },
        "library_version": __version__,
    }
