"""``ckpt.Manager``: the checkpoint lifecycle of a training loop.

Periodic async saves, a ``latest`` marker and retention that act only after a
save is committed, restore from the newest checkpoint that loads, and an
emergency save on preemption. Everything after a save is handed to one
background thread that works in commit order, so a deletion can never run
ahead of the checkpoint that justifies it.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from . import agree
from .catalog import Entry, EntryStatus, collect, latest_name, plan_gc, scan
from .errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptChunkError,
    RootInUseError,
    StateDictMismatchError,
)
from .format import LATEST
from .lease import LEASE_S, RootLease
from .load import load
from .locate import read_latest
from .options import LoadOptions, RetentionPolicy, SaveOptions
from .readonce import can_broadcast, scan_once
from .retention import order_key
from .save import SaveHandle, async_save
from .storage import open_storage

log = logging.getLogger("ckpt.manager")

# Managers whose worker runs, by id: stopped at interpreter exit (a script that never calls close()).
_live_managers: dict[int, Manager] = {}


def _stop_all_at_exit() -> None:
    for manager in list(_live_managers.values()):
        manager._stop_worker()


threading._register_atexit(_stop_all_at_exit)


# What restore() skips: a checkpoint that is damaged, corrupt or gone. A mismatch with the target,
# a storage failure or anything else is raised on every rank.
SKIPPED = (CheckpointFormatError, CorruptChunkError, CheckpointNotFoundError)


@dataclass
class _Pending:
    name: str
    step: int
    handle: SaveHandle


@dataclass
class Manager:
    """Saves every ``every_steps`` steps under ``root``/step-NNNNNNNN and keeps what ``retention`` says.

    Create it on every rank with the same arguments. ``restore`` returns the step
    to resume at (the saved step + 1) or None for a fresh start. ``storage_options``
    (fsspec: credentials, endpoint_url) apply to listing, saving and loading.
    ``incremental``: each save references the chunks it shares with the newest committed
    checkpoint (the ``latest`` marker's) instead of writing them again (content digests,
    ``SaveOptions.incremental_from``); every checkpoint still loads on its own, and retention
    keeps what remaining checkpoints reference.

    One job per root: rank 0 holds the root's owner record (``ckpt.lease``), renewed every
    ``lease_s / 4`` seconds; a Manager of another job on the same root raises RootInUseError
    on every rank (within about a renew period), and a job whose record was taken over
    raises it at its next ``maybe_save``. ``lease_s=None`` writes no record.
    """

    root: str
    every_steps: int | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    save_options: SaveOptions = field(default_factory=SaveOptions)
    load_options: LoadOptions = field(default_factory=LoadOptions)
    process_group: Any = None
    handle_sigterm: bool = True
    preemption_deadline_s: float = 120.0
    name_format: str = "step-{step:08d}"
    incremental: bool = False
    lease_s: float | None = LEASE_S

    def __post_init__(self) -> None:
        # One set of storage options (credentials, endpoint) for listing, saving and loading;
        # copies carry them, the caller's option objects stay as they were.
        if self.storage_options:
            if not self.save_options.storage_options:
                self.save_options = replace(self.save_options, storage_options=dict(self.storage_options))
            if not self.load_options.storage_options:
                self.load_options = replace(self.load_options, storage_options=dict(self.storage_options))
        self.storage = open_storage(
            self.root,
            **(self.storage_options or self.save_options.storage_options or self.load_options.storage_options),
        )
        self.rank = dist.get_rank(self.process_group) if dist.is_initialized() else 0
        self.world = dist.get_world_size(self.process_group) if dist.is_initialized() else 1
        self._lease = None
        error = None
        if self.rank == 0 and self.lease_s is not None:
            self._lease = RootLease(self.storage, self.lease_s)
            try:
                self._lease.acquire()
            except RootInUseError as e:
                self._lease, error = None, e
        agree.raise_together(error, f"ckpt.Manager({self.root})", self.process_group)
        self.should_stop = False  # set after an emergency save: leave the training loop
        self._preempt = threading.Event()
        self._errors: list[BaseException] = []
        self._in_flight: dict[str, _Pending] = {}
        # Checkpoints newer than the one restore() loaded (name -> step): retention keeps them, and
        # they do not count against this job's own saves, until the job commits a newer step.
        self._guarded: dict[str, int | None] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        # Not a daemon thread, stopped before interpreter shutdown (threading's own exit hook, which
        # runs before non-daemon threads are joined): a daemon thread inside torch (retention, a
        # save's wait) while the interpreter tears torch down aborts the process.
        self._worker = threading.Thread(target=self._finish_saves, name="ckpt-manager")
        self._worker.start()
        _live_managers[id(self)] = self
        if self.handle_sigterm and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    # -- saving ---------------------------------------------------------------------------------
    def save_now(self) -> None:
        """Ask for an emergency save at the next ``maybe_save`` (as SIGTERM does)."""
        self._preempt.set()

    def maybe_save(
        self, step: int, state_dict: dict, metrics: dict[str, float] | None = None, metadata: dict | None = None
    ) -> SaveHandle | None:
        """Save if this step is due or a preemption was requested; never blocks
        longer than the snapshot, except for an emergency save, which completes
        (within ``preemption_deadline_s``) before returning and sets ``should_stop``."""
        self._raise_background_errors()
        lost = self._lease.lost if self._lease is not None else None
        # One all-reduce per step for both: a preemption anywhere, a lost run root (rank 0's lease).
        emergency, root_lost = self._agree(self._preempt.is_set(), lost is not None)
        if root_lost:  # every rank stops saving there
            raise lost or RootInUseError(f"{self.root}: rank 0 lost the run root to another job")
        if emergency:
            handle = self.save(step, state_dict, metrics, metadata)
            handle.wait(timeout=self.preemption_deadline_s)
            self._queue.join()  # latest marker and retention done too
            self.should_stop = True
            return handle
        if self.every_steps and step % self.every_steps == 0:
            return self.save(step, state_dict, metrics, metadata)
        return None

    def save(
        self, step: int, state_dict: dict, metrics: dict[str, float] | None = None, metadata: dict | None = None
    ) -> SaveHandle:
        """Save now, asynchronously; the marker and retention follow its commit."""
        name = self.name_format.format(step=step)
        options = self.save_options
        if self.incremental:
            base = self.latest
            base_uri = f"{self.root.rstrip('/')}/{base}" if base not in (None, name) else None
            options = replace(options, incremental=True, incremental_from=base_uri)
        handle = async_save(
            state_dict,
            f"{self.root.rstrip('/')}/{name}",
            step=step,
            metrics=metrics,
            metadata=metadata,
            options=options,
            process_group=self.process_group,
        )
        pending = _Pending(name, step, handle)
        with self._lock:
            self._in_flight[name] = pending
        self._queue.put(pending)
        return handle

    def wait(self) -> None:
        """Block until every save so far is committed, marked and retention has run."""
        self._queue.join()
        self._raise_background_errors()

    def close(self) -> None:
        """Wait for in-flight saves, then stop the background thread."""
        try:
            self.wait()
        finally:
            self._stop_worker()
            if self.handle_sigterm and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._previous_handler)

    def _stop_worker(self) -> None:
        """Let the worker finish what is queued (marker, retention), then end it and give up
        the root. Idempotent."""
        if self._worker.is_alive():
            self._queue.put(None)
            self._worker.join()
        if self._lease is not None:
            lease, self._lease = self._lease, None
            try:
                lease.release()
            except Exception as e:  # the record expires by itself
                log.warning("%s: could not release the run root: %s: %s", self.root, type(e).__name__, e)
        _live_managers.pop(id(self), None)

    # -- restoring ------------------------------------------------------------------------------
    def restore(self, state_dict: dict, step: int | None = None) -> int | None:
        """Load the newest checkpoint that loads completely (or the one saved at ``step``);
        return its step + 1, or None when there is nothing to resume from.

        Only damaged, corrupt and incomplete checkpoints are skipped, each with a warning that
        says why; all ranks agree on the one they load. A target that does not match a complete
        checkpoint (a renamed key, a fresh optimizer's missing state) raises
        ``StateDictMismatchError``: it is never taken for a reason to start over. A ``step`` that
        has no committed checkpoint, or does not load, raises too. Checkpoints newer than the
        one loaded are kept by retention until this job commits a newer step.
        """
        entries = sorted(self._checkpoints_once(), key=lambda e: order_key(e.info()), reverse=True)
        if step is not None:
            found = [e for e in entries if e.step == step and e.status is EntryStatus.COMPLETE]
            if not found:
                raise CheckpointNotFoundError(
                    f"{self.root}: no committed checkpoint at step {step} (steps: {self.all_steps()})"
                )
            manifest = load(state_dict, found[0].uri, options=self.load_options, process_group=self.process_group)
            self._guard_newer_than(found[0], entries)
            return (manifest.step if manifest.step is not None else step) + 1
        complete = [e for e in entries if e.status is EntryStatus.COMPLETE]
        newest = order_key(complete[0].info()) if complete else None
        for e in entries:
            if e.status is EntryStatus.DAMAGED:
                log.warning("skipping %s: damaged manifest: %s", e.uri, e.error)
            elif e.status is not EntryStatus.COMPLETE and (newest is None or order_key(e.info()) > newest):
                log.warning("skipping %s: incomplete (no manifest; the save never committed)", e.uri)
        for e in complete:
            try:  # every rank raises together (ckpt.load agrees), so every rank skips or raises alike
                manifest = load(state_dict, e.uri, options=self.load_options, process_group=self.process_group)
            except StateDictMismatchError:
                raise  # the target does not match a good checkpoint: never a reason to start over
            except SKIPPED as exc:
                log.warning("skipping %s: %s: %s", e.uri, type(exc).__name__, exc)
                continue
            self._guard_newer_than(e, entries)
            return (manifest.step if manifest.step is not None else e.step or 0) + 1
        self._guard_newer_than(None, entries)
        return None

    def _guard_newer_than(self, restored: Entry | None, entries: list[Entry]) -> None:
        """Keep every checkpoint newer than ``restored`` (all of them after a fresh start) from
        retention until this job has committed a newer step: skipped ones may be repairable, and a
        run that restarted behind them must not have its own saves pushed out by them."""
        floor = order_key(restored.info()) if restored is not None else None
        with self._lock:
            self._guarded = {
                e.name: e.step
                for e in entries
                if e.status is not EntryStatus.INCOMPLETE and (floor is None or order_key(e.info()) > floor)
            }

    # -- listing ----------------------------------------------------------------------------------
    @property
    def latest(self) -> str | None:
        """Name of the newest committed checkpoint, from the marker."""
        self.storage.invalidate()
        return latest_name(self.storage)

    def latest_step(self) -> int | None:
        """Step of the newest committed checkpoint (the ``latest`` marker's, else the highest)."""
        self.storage.invalidate()
        marker = read_latest(self.storage)
        if marker is not None and marker.get("step") is not None:
            return marker["step"]
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Steps of every committed checkpoint under the root, ascending."""
        return sorted({e.step for e in self.checkpoints() if e.status is EntryStatus.COMPLETE and e.step is not None})

    def checkpoints(self) -> list[Entry]:
        """Every checkpoint under the root, committed or not (empty for a new root)."""
        try:
            return scan(self.root, self.storage.options)
        except FileNotFoundError:
            return []

    def _checkpoints_once(self) -> list[Entry]:
        """``checkpoints()`` as rank 0 lists them, on every rank: one listing (and one manifest read
        per checkpoint) for the whole job instead of one per rank, and one view that all judge."""
        if self.world > 1 and can_broadcast(self.process_group):
            return scan_once(self.root, self.storage.options, self.process_group)
        return self.checkpoints()

    # -- background -------------------------------------------------------------------------------
    def _finish_saves(self) -> None:
        while True:
            pending = self._queue.get()
            if pending is None:
                self._queue.task_done()
                return
            try:
                pending.handle.wait()
                if self.rank == 0:
                    self._mark_latest(pending)
                    self._apply_retention(pending.step)
            except BaseException as e:
                log.error("save %s/%s failed: %s", self.root, pending.name, e)
                self._errors.append(e)
            finally:
                with self._lock:
                    self._in_flight.pop(pending.name, None)
                self._queue.task_done()

    def _mark_latest(self, pending: _Pending) -> None:
        """Point ``latest`` at a just-committed checkpoint, unless a newer one holds it."""
        self.storage.invalidate()
        current = read_latest(self.storage)  # a damaged marker is replaced
        if current is not None and current.get("step") is not None and current["step"] > pending.step:
            return
        doc = {"name": pending.name, "step": pending.step, "save_id": pending.handle.save_id}
        self.storage.put_atomic(LATEST, json.dumps(doc).encode())

    def _apply_retention(self, committed_step: int) -> None:
        with self._lock:
            in_flight = frozenset(self._in_flight)
            # released once this job has committed a step newer than theirs
            self._guarded = {n: s for n, s in self._guarded.items() if s is None or s >= committed_step}
            guarded = set(self._guarded)
        entries = [e for e in self.checkpoints() if e.name not in guarded]
        doomed = plan_gc(entries, self.retention, time.time(), in_flight)
        if doomed:
            kept = {e.name for e in collect(self.root, doomed, self.storage.options)}
            for entry in doomed:
                log.info("retention %s %s", "retired" if entry.name in kept else "removed", entry.uri)

    # -- helpers ----------------------------------------------------------------------------------
    def _agree(self, *flags: bool) -> Any:
        """Each flag true on every rank if it is true on any (one small all-reduce); a single
        flag comes back as a bool, several as a tuple."""
        if self.world == 1:
            agreed = tuple(flags)
        else:
            device = "cuda" if "nccl" in str(dist.get_backend(self.process_group)) else "cpu"
            t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
            agreed = tuple(bool(x) for x in t.tolist())
        return agreed[0] if len(agreed) == 1 else agreed

    def _raise_background_errors(self) -> None:
        if self._errors:
            error = self._errors.pop(0)
            raise error

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM: an emergency checkpoint will be saved at the next step boundary")
        self._preempt.set()
