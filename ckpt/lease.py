"""One job per run root: the owner record a ``ckpt.Manager`` creates exclusively and keeps fresh.

Two jobs saving under one root would race on every checkpoint, the ``latest``
marker and retention. So rank 0 of a Manager's job creates ``<root>/_owner.json``
(only if absent: link(2) / If-None-Match, as the manifest) and renews it every
``lease_s / 4`` seconds from a thread of its own. Another job that finds a live
record fails with RootInUseError naming the owner.

A record can outlive its job (kill -9, a lost node), so it is taken over when it
is stale: its process on this host is gone, it names this very job (the same
``CKPT_JOB_ID``, ``SLURM_JOB_ID`` or ``TORCHELASTIC_RUN_ID``: a restart), or it
was not renewed within ``lease_s``. To tell a live owner from a dead one on
another host, a new Manager watches the record: a renewal within a renew period
means live (it fails within seconds); none within ``lease_s`` means dead (it
takes over). An owner whose record was taken over learns it at its next renewal.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from .errors import RootInUseError
from .storage import ConditionalPutUnsupportedError, Storage

log = logging.getLogger("ckpt.lease")

OWNER = "_owner.json"
LEASE_S = 60.0
_JOB_VARS = ("CKPT_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


def job_id() -> str | None:
    """This job's identity across restarts, from the launcher's environment (None if unknown)."""
    for var in _JOB_VARS:
        value = os.environ.get(var, "")
        if value and value != "none":  # torchrun's default rendezvous id names no job
            return f"{var}={value}"
    return None


class RootLease:
    """Rank 0's claim on a run root: :meth:`acquire`, then renewed in a thread until :meth:`release`."""

    def __init__(self, storage: Storage, lease_s: float = LEASE_S) -> None:
        self.storage, self.lease_s = storage, lease_s
        now = time.time()
        self.doc: dict[str, Any] = {
            "owner": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pidns": _pid_namespace(),  # pids compare only within one namespace (containers)
            "job": job_id(),
            "started": now,
            "renewed": now,
        }
        self.lost: RootInUseError | None = None  # set by the renewing thread when another job took over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def renew_s(self) -> float:
        return self.lease_s / 4

    def acquire(self) -> None:
        """Own the root, or raise RootInUseError naming the job that does."""
        seen, since = None, time.monotonic()
        while True:
            if seen is None:  # no record (or it went away): create it, only if absent
                if self._create():
                    self._start()
                    return
                seen, since = self._read(), time.monotonic()
                continue
            why = self._stale(seen, time.monotonic() - since)
            if why is not None:
                log.warning("%s: taking over the run root from %s (%s)", self.storage.uri, _who(seen), why)
                self._write()
                self._start()
                return
            time.sleep(min(1.0, self.renew_s / 4))
            current = self._read()
            if current is None or current != seen:
                if current is not None and current.get("owner") == seen.get("owner"):  # renewed: it is alive
                    raise RootInUseError(
                        f"{self.storage.uri}: in use by {_who(current)}, which renews its lease; "
                        "two jobs must not save under one run root (use another root, or stop that job)"
                    )
                seen, since = current, time.monotonic()  # a new owner: watch it afresh

    def release(self) -> None:
        """Stop renewing and remove the record if it is still this job's."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        current = self._read()
        if current is not None and current.get("owner") == self.doc["owner"]:
            self.storage.delete(OWNER)

    def _stale(self, current: dict[str, Any], watched_s: float) -> str | None:
        """Why the record belongs to no live job (None: it may)."""
        mine = self.doc
        here = current.get("host") == mine["host"] and current.get("pidns") == mine["pidns"]
        if here and current.get("pid") == mine["pid"]:
            return "an earlier Manager of this process"
        if here and not _alive(current.get("pid")):
            return f"its process {current.get('pid')} on this host is gone"
        if mine["job"] is not None and current.get("job") == mine["job"]:
            return f"the same job ({mine['job']}) restarted"
        age = time.time() - float(current.get("renewed") or 0)
        if age > self.lease_s and watched_s > self.renew_s:
            return f"not renewed for {age:.0f}s (lease {self.lease_s:.0f}s)"
        if watched_s > self.lease_s:
            return f"not renewed while watched for {watched_s:.0f}s (lease {self.lease_s:.0f}s)"
        return None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                current = self._read()
                if current is not None and current.get("owner") != self.doc["owner"]:
                    self.lost = RootInUseError(
                        f"{self.storage.uri}: the run root was taken over by {_who(current)}; "
                        "this job no longer owns it and must stop saving there"
                    )
                    log.error("%s", self.lost)
                    return
                self.doc["renewed"] = time.time()
                self._write()
            except Exception as e:  # a storage hiccup: try again next period
                log.warning("%s: could not renew the run root's lease: %s: %s", self.storage.uri, type(e).__name__, e)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="ckpt-lease")
        self._thread.start()

    def _bytes(self) -> bytes:
        return json.dumps(self.doc).encode()

    def _write(self) -> None:
        self.storage.put_atomic(OWNER, self._bytes())

    def _create(self) -> bool:
        try:
            if self.storage.supports_put_if_absent:
                return self.storage.put_if_absent(OWNER, self._bytes())
        except ConditionalPutUnsupportedError:
            pass
        if self.storage.exists(OWNER):  # no conditional create here: check, then write
            return False
        self._write()
        return True

    def _read(self) -> dict[str, Any] | None:
        self.storage.invalidate()
        try:
            doc = json.loads(self.storage.read_bytes(OWNER))
        except (FileNotFoundError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None


def _who(doc: dict[str, Any] | None) -> str:
    if doc is None:
        return "an unknown job"
    job = f", {doc['job']}" if doc.get("job") else ""
    return f"pid {doc.get('pid')} on {doc.get('host')}{job}"


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
