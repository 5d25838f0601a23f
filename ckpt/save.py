"""``ckpt.save`` / ``ckpt.async_save``: describe, plan (once per structure), stage, hand off to persist."""

from __future__ import annotations

import secrets
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch
import torch.distributed as dist

from ._version import __version__
from .commit import report_failure
from .describe import Flat, TensorEntry, check_json_value, flatten, local_view
from .engine import PersistJob, StagedChunk, Timings
from .errors import CheckpointExistsError, SaveBusyError, UnsupportedValueError
from .format import MANIFEST, dtype_name, object_pattern
from .framing import ChunkSpec
from .liveness import interval_for, start_heartbeat
from .options import OnBusy, SaveOptions
from .persist import persister_for
from .plan import SavePlan, WriteItem, fingerprint, make_save_plan, rank_descriptor
from .refs import check_base
from .stage import BufferCache, stage
from .storage import open_storage
from .values import encode_checked


class _Planner:
    """Caches save plans by state-dict structure: collectives only on a new structure."""

    def __init__(self) -> None:
        self._plans: dict[tuple[str, int], SavePlan] = {}
        self._counts: dict[str, int] = {}

    def plan(
        self, tensors: dict[str, TensorEntry] | None, error: BaseException | None, options: SaveOptions, group
    ) -> tuple[SavePlan, str]:
        """The plan and save id. A rank with an ``error`` whose tensors are described still
        reuses a cached plan as the others do (no collective): the caller then reports the
        error under that save id, so the others fail at once instead of hanging in a gather."""
        rank, world = _rank_world(group)
        desc, own, described = {}, {}, False
        if tensors is not None:
            try:
                desc, own = rank_descriptor(tensors, _group_rank(group))
                described = True
            except (UnsupportedValueError, ValueError, TypeError):
                if error is None:
                    raise
        fp = fingerprint(desc, own, world, options.chunk_bytes)
        cache_key = (fp, id(group))
        plan = self._plans.get(cache_key) if described else None
        if plan is not None and options.agree_on_plan and world > 1:
            # One tiny collective: re-plan everywhere unless every rank reuses the same plan.
            tokens: list[str | None] = [None] * world
            dist.all_gather_object(tokens, plan.token, group=group)
            if len(set(tokens)) != 1:
                plan = None
        elif plan is None and options.agree_on_plan and world > 1:
            dist.all_gather_object([None] * world, None, group=group)  # the other ranks' check above
        if plan is None:
            exchange = _DistExchange(rank, world, group)
            if error is not None:
                desc, own = {}, {}
            plan = make_save_plan(desc, own, error, tensors or {}, exchange, options.chunk_bytes, secrets.token_hex(4))
            self._plans[cache_key] = plan
        n = self._counts.get(plan.token, 0)
        self._counts[plan.token] = n + 1
        return plan, f"{plan.token}-{n:06d}"


_planner = _Planner()
_staging_buffers = BufferCache()


class _DistExchange:
    """Planning's collectives over the save's process group (one all-gather, one broadcast per class)."""

    def __init__(self, rank: int, world: int, group) -> None:
        self.rank, self.world, self.group = rank, world, group

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any, src: int) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=src)
        return box[0]


def _group_rank(group):
    """Global rank -> rank in the save's group (-1 outside it)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return int
    ranks = {g: i for i, g in enumerate(dist.get_process_group_ranks(group))}
    return lambda r: ranks.get(r, -1)


def _rank_world(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _borrow(tensors: dict[str, TensorEntry], items: list[WriteItem]) -> list[StagedChunk]:
    """Host bytes for each chunk without a snapshot: views of CPU tensors where
    possible. Only for a blocking save, where the caller cannot mutate meanwhile."""
    staged = []
    for item in items:
        entry = tensors[item.key]
        piece = entry.pieces[item.piece]
        view = local_view(entry.local.detach(), piece)[item.chunk.relative_to(piece.box).slices()]
        host = view.to("cpu").contiguous()
        staged.append(StagedChunk(ChunkSpec(item.key, item.chunk, entry.dtype), host.reshape(-1).view(torch.uint8)))
    return staged


class SaveHandle:
    """A save in flight. ``wait()`` returns the save id once the checkpoint is
    committed on every rank, or raises what went wrong."""

    def __init__(self, uri: str, save_id: str, timings: Timings) -> None:
        self.uri, self.save_id, self.timings = uri, save_id, timings
        self._staged = threading.Event()
        self._stage_error: BaseException | None = None
        self._future: Future | None = None
        self._handoff: Future = Future()

    def wait_staged(self) -> None:
        """Block until the snapshot is taken (returns at once unless ``lazy=True``)."""
        self._staged.wait()
        if self._stage_error is not None:
            raise self._stage_error

    def handed_off(self) -> bool:
        """True once the save no longer needs this process: the daemon holds every byte of the
        snapshot (Unix socket: when ``async_save`` returns; TCP: when the stream has ended),
        or, persisting in this process, once it committed. Exiting or being killed after that
        does not lose the save."""
        return self._handoff.done() and self._handoff.exception() is None

    def wait_handed_off(self, timeout: float | None = None) -> None:
        """Block until :meth:`handed_off` (or raise why the save failed before that)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._staged.wait(timeout):
            raise TimeoutError(f"{self.uri}: save {self.save_id}: the snapshot was not taken within {timeout}s")
        self.wait_staged()
        try:
            self._handoff.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise TimeoutError(f"{self.uri}: save {self.save_id}: not handed off within {timeout}s") from None

    def done(self) -> bool:
        """True once the save has committed or failed (``wait()`` then returns at once)."""
        if self._staged.is_set() and self._stage_error is not None:
            return True
        return self._future is not None and self._future.done()

    def wait(self, timeout: float | None = None) -> str:
        """Block until committed (or raise why not); ``timeout`` covers a lazy snapshot too."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._staged.wait(timeout):
            raise TimeoutError(f"{self.uri}: save {self.save_id}: the snapshot was not taken within {timeout}s")
        self.wait_staged()
        assert self._future is not None
        self._future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.save_id


# optimizer -> lazy saves whose snapshot its next step must wait for
_guarded: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[SaveHandle]] = weakref.WeakKeyDictionary()
_guard_lock = threading.Lock()


def _guard(optimizer: torch.optim.Optimizer, handle: SaveHandle) -> None:
    """Make ``optimizer.step`` wait for ``handle``'s snapshot.

    One step pre-hook per optimizer, registered once and never removed: torch
    iterates over the hooks while calling them, so a hook that removed itself
    (or another's removal) would break the step whenever other hooks exist.
    """
    with _guard_lock:
        pending = _guarded.get(optimizer)
        if pending is None:
            pending = _guarded[optimizer] = []
            optimizer.register_step_pre_hook(_wait_for_snapshots)
        pending.append(handle)


def _wait_for_snapshots(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    with _guard_lock:
        pending = _guarded.get(optimizer, [])
        handles, pending[:] = list(pending), []
    for h in handles:
        # Only wait: a failed snapshot is raised by ``wait()``, not by the training step.
        h._staged.wait()


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

    The same as ``async_save(...).wait()``, except that CPU tensors are written
    from where they are instead of being snapshotted first (the caller is
    blocked anyway). Returns the save id recorded in the manifest.
    """
    return _start(state_dict, uri, step, metrics, metadata, options, process_group, snapshot=False).wait()


def async_save(
    state_dict: dict,
    uri: str,
    *,
    step: int | None = None,
    metrics: dict[str, float] | None = None,
    metadata: dict[str, Any] | None = None,
    options: SaveOptions | None = None,
    process_group=None,
    lazy: bool = False,
    guard: torch.optim.Optimizer | None = None,
) -> SaveHandle:
    """Snapshot the state into a reused host buffer and persist it in the background.

    Returns once the snapshot is taken; mutating the tensors afterwards does not
    change what is saved. With ``lazy=True`` it returns at once and the copy
    overlaps the caller's next compute; pass the optimizer as ``guard`` (its
    ``step`` then waits for the copy) or call ``handle.wait_staged()`` before
    changing parameters.
    """
    return _start(
        state_dict, uri, step, metrics, metadata, options, process_group, snapshot=True, lazy=lazy, guard=guard
    )


def _start(
    state_dict, uri, step, metrics, metadata, options, group, *, snapshot: bool, lazy: bool = False, guard=None
) -> SaveHandle:
    options = options or SaveOptions()
    timings = Timings()
    storage = open_storage(uri, **options.storage_options)
    rank, world = _rank_world(group)
    flat, error = None, None
    with timings.phase("plan"):
        try:
            flat = flatten(state_dict)
            for key, entry in flat.tensors.items():
                dtype_name(entry.dtype, key)  # an unstorable dtype is this rank's error, reported to all
            for name, v in (("metrics", metrics), ("metadata", metadata)):
                check_json_value(name, v or {})
            if storage.exists(MANIFEST) and not options.overwrite:
                raise CheckpointExistsError(f"{uri}: a committed checkpoint exists; pass SaveOptions(overwrite=True)")
            if options.incremental_from is not None:
                check_base(uri, options.incremental_from)
        except (UnsupportedValueError, CheckpointExistsError, ValueError, TypeError) as e:
            if world == 1:
                raise
            error = e
            if flat is None:  # a bad value: the tensors alone still say which plan the others reuse
                flat = _tensors_only(state_dict)
        plan, save_id = _planner.plan(flat.tensors if flat else None, error, options, group)
        if error is not None:  # the others reuse a cached plan: they learn of this from storage, now
            report_failure(storage, save_id, rank, error)
            raise error
    assert flat is not None
    tensors = flat.tensors
    # Rank 0's head carries what the manifest needs; the first rank of each class of ranks adds
    # its structure (classes hold different keys), which the committer merges. Every other rank
    # with values adds them too (pipeline stages hold different keys), with its structure for the
    # committer to merge should they hold a key no rank before had (``commit.assemble``). Values are
    # encoded into new JSON objects (a copy): after async_save returns the caller may mutate its
    # lists and dicts (a scheduler's learning rates), and the committer must still write what was
    # passed. ``index_keys``: the rule tensors whose chunk records go to the object's index (none
    # in an incremental save: its chunks may lie in an earlier checkpoint's objects).
    rules = options.incremental_from is None
    head: dict[str, Any] = {"encoding": options.encoding()}
    head["index_keys"] = sorted({i.key for i in plan.items if rules and plan.tensors[i.key].rule})
    if plan.leader or rank == 0:
        head["structure"] = flat.structure
    if rank == 0:
        head.update(_head(plan, flat.values, step, metrics, metadata, options, world, rules))
        head["rank_objects"] = object_pattern(save_id, world)
    elif flat.values:
        head["values"] = {k: encode_checked(v, k) for k, v in flat.values.items()}
        if not plan.leader:
            head["value_structure"] = flat.structure
    head["heartbeat_s"] = interval_for(storage, options.heartbeat_s)  # for a daemon's own heartbeat
    persister = persister_for(options)
    handle = SaveHandle(uri, save_id, timings)
    # This rank is alive to the others from here until the daemon holds its snapshot (then the
    # daemon beats) or, persisting in-process, until persist_rank stops it (ckpt.liveness).
    beat = start_heartbeat(storage, save_id, rank, world, head["heartbeat_s"])
    if beat is not None:
        handle._handoff.add_done_callback(lambda _: beat.stop())

    def job(chunks: list[StagedChunk]) -> PersistJob:
        return PersistJob(
            storage, save_id, rank, world, chunks, options.block_bytes, head, options.commit_timeout_s, beat
        )

    if not snapshot and not persister.needs_host_buffer:
        with timings.phase("stage"):
            try:
                chunks = _borrow(tensors, plan.items)
            except BaseException as e:  # tell the others now, or they wait out the commit timeout
                report_failure(storage, save_id, rank, e)
                if beat is not None:
                    beat.stop()
                raise
        handle._staged.set()
        handle._future = persister.submit(job(chunks), timings, release=None, handoff=handle._handoff)
        return handle

    # Shared memory or not is part of the key: a Unix-socket daemon maps the buffer by name.
    shm = persister.shm_path(f"{plan.token}-r{_rank_world(None)[0]:05d}") if persister.needs_shared_memory else None
    key = (plan.token, persister.name, persister.needs_shared_memory)
    buf, slots = _staging_buffers.get(key, tensors, plan.items, shm)
    if not buf.busy.acquire(blocking=options.on_busy is OnBusy.WAIT):
        error = SaveBusyError(f"{uri}: the previous save with this structure is still persisting (on_busy='refuse')")
        if world > 1:  # ranks that did not refuse: their committer aborts now, not at its timeout
            report_failure(storage, save_id, rank, error)
        if beat is not None:
            beat.stop()
        raise error

    # The stream the caller's kernels run on: the copy must follow them, even from the lazy thread.
    after = torch.cuda.current_stream() if any(e.local.is_cuda for e in tensors.values()) else None

    def do_stage() -> None:
        try:
            with timings.phase("stage"):
                chunks = stage(tensors, plan.items, slots, buf, after=after)
            handle._future = persister.submit(
                job(chunks), timings, release=buf.busy, buf=buf, handoff=handle._handoff
            )
        except BaseException as e:
            handle._stage_error = e
            if not handle._handoff.done():
                handle._handoff.set_exception(e)
            buf.busy.release()
            report_failure(storage, save_id, rank, e)
        finally:
            handle._staged.set()

    if not lazy:
        do_stage()
        if handle._stage_error is not None:
            raise handle._stage_error
        return handle
    if guard is not None:
        _guard(guard, handle)
    thread = threading.Thread(target=do_stage, name="ckpt-lazy-stage")
    _lazy_threads.add(thread)
    thread.start()
    return handle


# Lazy snapshots still copying. Joined before interpreter shutdown (threading's exit hooks run
# before torch is torn down and, registered after concurrent.futures', before its executors
# stop taking work), so a script that ends right after a lazy async_save still saves.
_lazy_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def _join_lazy_snapshots() -> None:
    for thread in list(_lazy_threads):
        thread.join()


threading._register_atexit(_join_lazy_snapshots)


def _tensors_only(state_dict: dict) -> Flat | None:
    """The state dict's tensors described, its values unchecked; None if a tensor is the problem."""
    try:
        return flatten(state_dict, check_values=False)
    except (UnsupportedValueError, ValueError, TypeError):
        return None


def _head(
    plan: SavePlan, values, step, metrics, metadata, options: SaveOptions, world: int, rules: bool = True
) -> dict[str, Any]:
    """What only the committer's manifest needs, carried in rank 0's index."""
    meshes = sorted({m.layout for m in plan.tensors.values() if m.layout.startswith("DTensor")})
    return {
        "tensors": {
            k: {"shape": list(m.shape), "dtype": dtype_name(m.dtype), "layout": m.layout}
            | ({"rule": m.rule.to_json()} if m.rule and rules else {})
            for k, m in plan.tensors.items()
        },
        "meshes": [m.to_json() for m in plan.meshes],
        "values": {k: encode_checked(v, k) for k, v in values.items()},
        "block_bytes": options.block_bytes,
        "step": step,
        "metrics": encode_checked(dict(metrics or {}), "metrics"),
        "metadata": encode_checked(dict(metadata or {}), "metadata"),
        "topology": {
            "world_size": world,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "dtensor_layouts": meshes,
        },
        "library_version": __version__,
        "overwrite": options.overwrite,  # the committer may replace a committed checkpoint
    }
