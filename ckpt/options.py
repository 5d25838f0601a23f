"""What callers choose: save, load and retention settings, and the modes they name.

Kept apart from the modules that run saves and loads so that offline tools (writer,
reshard, merge, the CLI) configure them without importing the distributed save path.
Every class is frozen and keyword-only: a caller's options can be shared and are
never changed behind its back. Modes are string-valued enums; the plain strings
("wait", "min", ...) are accepted too and converted on construction.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class StrEnum(str, Enum):
    """A string-valued enum that prints as its value on every Python (``enum.StrEnum`` is 3.11+)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class OnBusy(StrEnum):
    """What an async save does while the previous save of its structure still persists."""

    WAIT = "wait"  # block until that save has released the staging buffer
    REFUSE = "refuse"  # raise SaveBusyError at once


class BestMode(StrEnum):
    """Which end of ``best_metric`` is best."""

    MIN = "min"
    MAX = "max"


def _coerce(obj: object, name: str, enum: type[StrEnum]) -> None:
    """Turn a plain-string mode into its enum member, naming the choices when it is not one."""
    value = getattr(obj, name)
    try:
        object.__setattr__(obj, name, enum(value))
    except ValueError:
        choices = " or ".join(repr(m.value) for m in enum)
        raise ValueError(f"{name} must be {choices}, not {value!r}") from None


FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


@dataclass(frozen=True, kw_only=True)
class Compression:
    """Lossless compression of the chunks of the dtypes named (ckpt/codec.py).

    codec: "zstd" (the only one). level: zstd level; on byte-grouped floating-point frames 1 is
    both the fastest and (within 1%) the smallest: higher levels only cost time there.
    byte_group: store each frame's bytes as planes (byte 0 of every element, then byte 1, ...)
    before zstd: exponent bytes repeat, so bf16 weights shrink about 1.4x instead of 1.3x.
    dtypes: the dtype names (``"bfloat16"``) or torch dtypes to compress; the rest is stored
    raw, as are chunks under 4 KiB and frames that do not shrink. Byte-grouped frames use zstd
    parameters tuned for exponent planes at every level (ckpt/codec.py ``PLANE_PARAMS``).
    Frames are the checksum blocks (``SaveOptions.block_bytes``): a partial read decompresses
    only the frames it needs.
    """

    codec: str = "zstd"
    level: int = 1
    byte_group: bool = True
    dtypes: tuple[Any, ...] = FLOAT_DTYPES

    def __post_init__(self) -> None:
        if self.codec != "zstd":
            raise ValueError(f"codec must be 'zstd', not {self.codec!r}")
        names = tuple(d if isinstance(d, str) else str(d).removeprefix("torch.") for d in self.dtypes)
        object.__setattr__(self, "dtypes", names)


def _daemon_from_env() -> str | None:
    return os.environ.get("CKPT_DAEMON") or None


@dataclass(frozen=True, kw_only=True)
class SaveOptions:
    """How a save lays out and commits its bytes.

    chunk_bytes: largest stored chunk; bigger tensors are cut into row-major slabs.
    block_bytes: checksum granularity; a partial read verifies whole blocks.
    overwrite: replace a committed checkpoint at the same location (atomically).
    commit_timeout_s: how long the committer waits for the slowest rank.
    heartbeat_s: while a rank's part of a save is in flight it rewrites a heartbeat object this
        often; a rank whose heartbeat stops for 5 intervals before its part is durable (killed,
        node lost) fails the save on every rank with RankLostError, instead of at
        ``commit_timeout_s``. None: 1 s on local or mounted file systems, 5 s on object stores
        (a PUT per rank per beat); 0 turns heartbeats off.
    storage_options: passed to fsspec (credentials, endpoint_url, ...).
    daemon: address of a node-local ``ckpt-server`` ("unix:///path" or "host:port"; default
        $CKPT_DAEMON) that persists the snapshot; None persists in a background thread.
    on_busy: an async save whose previous save (same structure) still persists either
        waits for it (``OnBusy.WAIT``) or is refused with SaveBusyError (``OnBusy.REFUSE``);
        memory never grows per save.
    agree_on_plan: a rank reuses its cached plan when its own shards are unchanged, with no
        collective. If the layout can change on some ranks only (explicit ``Sharded`` boxes
        moving between saves), set this: each save then costs one tiny all-gather.
    compression: a :class:`Compression` to compress chunks of the dtypes it names; None stores
        every chunk raw. (``ckpt.save`` / ``async_save`` / ``Manager`` and the offline
        ``CheckpointWriter``, which refuses only ``incremental``.)
    incremental: record each chunk's content digest (blake3), so that a later incremental
        save can reference it. Implied by ``incremental_from``.
    incremental_from: an earlier committed checkpoint under the same run root (a sibling
        location): chunks whose digest, size and dtype equal its record at the same key and
        box are referenced there instead of written. The checkpoint still loads on its own.
    """

    chunk_bytes: int = 64 << 20
    block_bytes: int = 4 << 20
    overwrite: bool = False
    commit_timeout_s: float = 600.0
    heartbeat_s: float | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    daemon: str | None = field(default_factory=_daemon_from_env)
    on_busy: OnBusy = OnBusy.WAIT
    agree_on_plan: bool = False
    compression: Compression | None = None
    incremental: bool = False
    incremental_from: str | None = None

    def __post_init__(self) -> None:
        if self.chunk_bytes <= 0 or self.block_bytes <= 0 or self.block_bytes % 64:
            raise ValueError("chunk_bytes must be positive and block_bytes a positive multiple of 64")
        if self.heartbeat_s is not None and self.heartbeat_s < 0:
            raise ValueError(f"heartbeat_s must be None, 0 (off) or positive, not {self.heartbeat_s!r}")
        _coerce(self, "on_busy", OnBusy)
        if self.incremental_from is not None:
            object.__setattr__(self, "incremental", True)

    def encoding(self) -> dict[str, Any]:
        """What the persisting rank needs of these options (``ckpt.engine.Encoding`` as JSON)."""
        c = self.compression
        return {
            "level": c.level if c else None,
            "byte_group": c.byte_group if c else True,
            "dtypes": list(c.dtypes) if c else [],
            "digests": self.incremental,
            "base": self.incremental_from,
        }


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """How a load reads.

    strict: missing and unexpected keys are errors (shape mismatches always are).
    partial: with strict, keys only the checkpoint has are fine (loading part of it, e.g. the
        model of a training checkpoint), but a key the target has and the checkpoint lacks is
        still an error (a renamed module must not load silently); DCP's default.
    fill: ``fill(key, global_shape, dtype)`` returns the tensor (plain, DTensor or ``Sharded``)
        to create for a stored tensor under an empty container of the target; None (or a
        None result) creates a plain tensor on the target's device.
    allow_dtype_cast: load a stored dtype into a target of another dtype.
    verify: check every byte read against its block checksum.
    max_gap_bytes / max_read_bytes: coalescing of neighbouring ranges into one request.
    io_threads: concurrent reads.
    storage_options: passed to fsspec (credentials, endpoint_url, ...).
    daemon: a node-local ckpt-server (default $CKPT_DAEMON) whose RAM copy of this
        very save, if it has one, serves the objects it holds; the rest comes from storage.
    share_replicas: bytes several ranks need (plain tensors every rank holds, DTensor shards
        replicated over a mesh dim) are read from storage once, split across those ranks, and
        broadcast over their process group (``ckpt.share``). ``"auto"`` (default) shares where
        it saves storage traffic: object stores, or a file system seen from several hosts (one
        host's page cache already reads a local file once), and not from the daemon's RAM tier
        or for less than ``share_min_bytes``. ``True`` always shares, ``False`` never. Every
        rank must pass the same setting.
    share_bucket_bytes: bytes a replica group reads per round; the next round's reads overlap
        the current round's broadcasts.
    share_min_bytes: under ``"auto"``, a replica group with less than this to share reads it directly.
    """

    strict: bool = True
    partial: bool = False
    allow_dtype_cast: bool = False
    verify: bool = True
    max_gap_bytes: int = 1 << 20
    max_read_bytes: int = 64 << 20
    io_threads: int = 4
    storage_options: dict[str, Any] = field(default_factory=dict)
    daemon: str | None = field(default_factory=_daemon_from_env)
    fill: Callable[[str, tuple[int, ...], torch.dtype], Any] | None = None
    share_replicas: bool | str = "auto"
    share_bucket_bytes: int = 64 << 20
    share_min_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.share_replicas not in (True, False, "auto"):
            raise ValueError(f"share_replicas must be True, False or 'auto', not {self.share_replicas!r}")
        if self.share_bucket_bytes <= 0:
            raise ValueError("share_bucket_bytes must be positive")


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """Keep a committed checkpoint if any rule keeps it; the newest is always kept.

    keep_last: the N newest. keep_best: the K best by ``best_metric`` (``best_mode``
    ``BestMode.MIN`` or ``MAX``; checkpoints without the metric never count as best).
    keep_every: those whose step is a multiple of N. keep_within_s: those younger
    than this. A policy with no rule keeps everything.
    """

    keep_last: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: BestMode = BestMode.MIN
    keep_every: int | None = None
    keep_within_s: float | None = None

    def __post_init__(self) -> None:
        if self.keep_best and not self.best_metric:
            raise ValueError("keep_best needs best_metric")
        _coerce(self, "best_mode", BestMode)

    @property
    def keeps_all(self) -> bool:
        return not any((self.keep_last, self.keep_best, self.keep_every, self.keep_within_s))
