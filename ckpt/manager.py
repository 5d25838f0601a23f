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
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch
import torch.distributed as dist

from .errors import CheckpointError
from .format import MANIFEST
from .load import LoadOptions, load
from .retention import CheckpointInfo, RetentionPolicy, order_key, select_deletions
from .save import SaveHandle, SaveOptions, async_save
from .storage import Storage

log = logging.getLogger("ckpt.manager")
LATEST = "latest"


@dataclass
class _Pending:
    name: str
    step: int
    handle: SaveHandle


@dataclass
class Manager:
    """Saves every ``every_steps`` steps under ``root``/step-NNNNNNNN and keeps what the policy says.

    Create it on every rank with the same arguments. ``restore`` returns the step
    to resume at (the saved step + 1) or None for a fresh start. ``storage_options``
    (fsspec: credentials, endpoint_url) apply to listing, saving and loading.
    """

    root: str
    every_steps: int | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    keep_last: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"
    keep_every: int | None = None
    keep_within_s: float | None = None
    save_options: SaveOptions = field(default_factory=SaveOptions)
    load_options: LoadOptions = field(default_factory=LoadOptions)
    process_group: Any = None
    handle_sigterm: bool = True
    preemption_deadline_s: float = 120.0
    name_format: str = "step-{step:08d}"

    def __post_init__(self) -> None:
        self.policy = RetentionPolicy(
            self.keep_last, self.keep_best, self.best_metric, self.best_mode, self.keep_every, self.keep_within_s
        )
        # One set of storage options (credentials, endpoint) for listing, saving and loading.
        for opts in (self.save_options, self.load_options):
            if self.storage_options and not opts.storage_options:
                opts.storage_options = dict(self.storage_options)
        self.storage = Storage(
            self.root,
            **(self.storage_options or self.save_options.storage_options or self.load_options.storage_options),
        )
        self.rank = dist.get_rank(self.process_group) if dist.is_initialized() else 0
        self.world = dist.get_world_size(self.process_group) if dist.is_initialized() else 1
        self.should_stop = False  # set after an emergency save: leave the training loop
        self._preempt = threading.Event()
        self._errors: list[BaseException] = []
        self._in_flight: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._worker = threading.Thread(target=self._finish_saves, name="ckpt-manager", daemon=True)
        self._worker.start()
        self._manifests: dict[str, CheckpointInfo] = {}
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
        emergency = self._agree(self._preempt.is_set())
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
        handle = async_save(
            state_dict,
            f"{self.root.rstrip('/')}/{name}",
            step=step,
            metrics=metrics,
            metadata=metadata,
            options=self.save_options,
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
            self._queue.put(None)
            self._worker.join()
            if self.handle_sigterm and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._previous_handler)

    # -- restoring ------------------------------------------------------------------------------
    def restore(self, state_dict: dict) -> int | None:
        """Load the newest checkpoint that loads completely; return its step + 1.

        Incomplete and corrupt checkpoints are skipped with a warning that says
        why; all ranks agree on the one they load.
        """
        infos = self.checkpoints()
        committed = sorted((c for c in infos if c.committed), key=order_key, reverse=True)
        newest_done = order_key(committed[0]) if committed else None
        for c in sorted(infos, key=order_key, reverse=True):
            if not c.committed and (newest_done is None or order_key(c) > newest_done):
                log.warning("skipping %s/%s: incomplete (no manifest; the save never committed)", self.root, c.name)
        for c in committed:
            error = None
            try:
                manifest = load(state_dict, f"{self.root.rstrip('/')}/{c.name}", options=self.load_options)
            except (CheckpointError, OSError, ValueError) as e:
                error = f"{type(e).__name__}: {e}"
            if not self._agree(error is not None):
                return (manifest.step if manifest.step is not None else c.step or 0) + 1
            log.warning("skipping %s/%s: %s", self.root, c.name, error or "another rank could not load it")
        return None

    # -- listing ----------------------------------------------------------------------------------
    @property
    def latest(self) -> str | None:
        """Name of the newest committed checkpoint, from the marker."""
        self.storage.invalidate()
        if not self.storage.exists(LATEST):
            return None
        return json.loads(self.storage.read_bytes(LATEST))["name"]

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint directory under the root, committed or not."""
        self.storage.invalidate()
        infos = []
        for name in self.storage.listdir(""):
            if name == LATEST or name.startswith((".", "_")):
                continue
            info = self._manifests.get(name)
            if info is None:
                info = self._describe(name)
                if info is None:
                    continue
                if info.committed:
                    self._manifests[name] = info
            infos.append(info)
        return infos

    def _describe(self, name: str) -> CheckpointInfo | None:
        match = re.search(r"(\d+)$", name)
        step = int(match.group(1)) if match else None
        if not self.storage.exists(f"{name}/{MANIFEST}"):
            if not self.storage.listdir(name):
                return None
            return CheckpointInfo(name, step, committed=False)
        try:
            doc = json.loads(self.storage.read_bytes(f"{name}/{MANIFEST}"))
            created = datetime.fromisoformat(doc["created"]).timestamp() if doc.get("created") else None
            metrics = tuple(sorted((k, float(v)) for k, v in (doc.get("metrics") or {}).items()))
            return CheckpointInfo(name, doc.get("step", step), True, created, metrics)
        except (ValueError, KeyError, TypeError):
            return CheckpointInfo(name, step, committed=True)  # restore will report what is wrong

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
                    self._apply_retention()
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
        if self.storage.exists(LATEST):
            current = json.loads(self.storage.read_bytes(LATEST))
            if current.get("step") is not None and current["step"] > pending.step:
                return
        doc = {"name": pending.name, "step": pending.step, "save_id": pending.handle.save_id}
        self.storage.put_atomic(LATEST, json.dumps(doc).encode())

    def _apply_retention(self) -> None:
        with self._lock:
            in_flight = frozenset(self._in_flight)
        doomed = select_deletions(self.checkpoints(), self.policy, time.time(), in_flight)
        latest = self.latest
        for name in doomed:
            if name == latest:
                continue
            # The manifest goes first: the checkpoint stops being loadable before its data goes.
            self.storage.delete(f"{name}/{MANIFEST}")
            self.storage.delete(name, recursive=True)
            self._manifests.pop(name, None)
            log.info("retention removed %s/%s", self.root, name)

    # -- helpers ----------------------------------------------------------------------------------
    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (one small all-reduce)."""
        if self.world == 1:
            return flag
        device = "cuda" if "nccl" in str(dist.get_backend(self.process_group)) else "cpu"
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(t.item())

    def _raise_background_errors(self) -> None:
        if self._errors:
            error = self._errors.pop(0)
            raise error

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM: an emergency checkpoint will be saved at the next step boundary")
        self._preempt.set()
