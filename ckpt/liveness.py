"""Liveness of the ranks of a save in flight: each rank's heartbeat object, and telling a stale one.

A rank killed with SIGKILL (or its node lost) writes no failure report; without a sign of
life the others would wait out ``commit_timeout_s``. So while a rank's part of a save is in
flight, a background thread rewrites ``_staging/<save_id>/[NN/]rank-NNNNN.alive`` every
interval with a new beat count. Whoever runs the rank's part beats: the trainer from the plan
until the daemon holds the snapshot, then the daemon, so a trainer killed after the handoff
does not fail the save. A worker stops once its index is written (nothing waits on it any
more); the committer at the commit point.

Only two kinds of reader look (no poll storm at thousands of ranks): the committer, at the
heartbeats of the ranks whose index is still missing, and each waiting rank at the
committer's alone. A heartbeat is judged by the reader's own clock, never by timestamps of
another host: it is stale once its bytes have not changed for ``HEARTBEAT_MISSES`` of the
writer's intervals over at least that many looks (a reader that was itself stalled has not
looked, so it does not count its own pause against the writer). A rank never seen beating
(still planning, an older writer, a writer with heartbeats off) is never judged: the commit
timeout still bounds that wait.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .format import STAGING_DIR, spread_prefix
from .storage import Storage

log = logging.getLogger("ckpt.liveness")

HEARTBEAT_MISSES = 5  # a heartbeat unchanged for this many of its intervals (and looks) is stale
LOCAL_INTERVAL_S = 1.0  # default interval on a local or mounted file system: a beat is a rename
REMOTE_INTERVAL_S = 5.0  # on an object store every beat is a PUT per rank
_READ_THREADS = 64
_UNREADABLE = b"\0unreadable"  # a read that failed (not: absent)


def heartbeat_name(save_id: str, rank: int, world: int) -> str:
    """Next to the rank's index, under the same spread prefix."""
    return f"{STAGING_DIR}/{save_id}/{spread_prefix(rank, world)}rank-{rank:05d}.alive"


def interval_for(storage: Storage, heartbeat_s: float | None) -> float | None:
    """The beat interval ``SaveOptions.heartbeat_s`` asks for: None picks by storage, 0 turns beats off."""
    if heartbeat_s is None:
        return REMOTE_INTERVAL_S if storage.is_remote else LOCAL_INTERVAL_S
    return float(heartbeat_s) if heartbeat_s > 0 else None


class Heartbeat:
    """Rewrites one rank's heartbeat object every ``interval_s`` from a daemon thread until stopped.

    Beats are best effort: a failed write is logged and the next one tried (a reader only ever
    concludes from beats that stop)."""

    def __init__(self, storage: Storage, save_id: str, rank: int, world: int, interval_s: float) -> None:
        self.storage, self.name, self.interval_s = storage, heartbeat_name(save_id, rank, world), interval_s
        self._doc = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "interval_s": interval_s}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ckpt-heartbeat-r{rank}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        """No beat starts after this returns (one in progress is waited for, up to an interval)."""
        self._stop.set()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(self.interval_s)

    def _run(self) -> None:
        beat = 0
        while not self._stop.is_set():
            try:
                self.storage.put_transient(self.name, json.dumps({**self._doc, "beat": beat}).encode())
            except Exception as e:
                log.warning("%s: heartbeat not written: %s: %s", self.storage.uri_of(self.name), type(e).__name__, e)
            beat += 1
            self._stop.wait(self.interval_s)


def start_heartbeat(
    storage: Storage, save_id: str, rank: int, world: int, interval_s: float | None
) -> Heartbeat | None:
    """A started heartbeat, or None where nobody would read it (one rank) or beats are off."""
    if world <= 1 or not interval_s:
        return None
    return Heartbeat(storage, save_id, rank, world, interval_s).start()


class Watch:
    """One reader's view of some ranks' heartbeats: which of them stopped beating.

    ``min_pause_s`` spaces the looks further apart than the writers' interval (waiting ranks
    on an object store: all of them read the committer's one object)."""

    def __init__(self, storage: Storage, save_id: str, world: int, min_pause_s: float = 0.0) -> None:
        self.storage, self.save_id, self.world, self.min_pause_s = storage, save_id, world, min_pause_s
        self._seen: dict[int, tuple[bytes | None, float, int]] = {}  # rank -> (bytes, unchanged since, looks)
        self._interval = interval_for(storage, None) or LOCAL_INTERVAL_S  # until a beat says its own
        self._next_look = 0.0

    def lost(self, ranks: Iterable[int]) -> list[dict[str, Any]]:
        """Failure reports (``{"rank", "error", "message"}``, as ``commit`` aborts with) of the
        ``ranks`` whose heartbeat went stale; looks at most once per interval, else returns []."""
        now = time.monotonic()
        if now < self._next_look:
            return []
        ranks = list(ranks)
        names = [heartbeat_name(self.save_id, r, self.world) for r in ranks]
        if len(names) > 1:
            with ThreadPoolExecutor(min(_READ_THREADS, len(names)), thread_name_prefix="ckpt-liveness") as pool:
                contents = list(pool.map(self._read, names))
        else:
            contents = [self._read(n) for n in names]
        now = time.monotonic()
        found = []
        for rank, raw in zip(ranks, contents):
            if raw is _UNREADABLE:
                continue
            before = self._seen.get(rank)
            if before is None or raw != before[0]:
                if raw is not None or before is not None:  # never seen beating: not judged
                    self._seen[rank] = (raw, now, 0)
                continue
            _, since, looks = before
            self._seen[rank] = (raw, since, looks + 1)
            doc = _parse(raw)
            interval = float(doc.get("interval_s") or self._interval)
            if looks + 1 >= HEARTBEAT_MISSES and now - since >= HEARTBEAT_MISSES * interval:
                found.append(_report(rank, doc, now - since, interval))
        intervals = [float(_parse(s[0]).get("interval_s") or 0) for s in self._seen.values() if s[0]]
        self._interval = min([i for i in intervals if i > 0], default=self._interval)
        self._next_look = time.monotonic() + max(self._interval, self.min_pause_s)
        return found

    def _read(self, name: str) -> bytes | None:
        try:
            return self.storage.read_bytes(name)
        except FileNotFoundError:
            return None
        except Exception as e:  # unreadable now is neither a beat nor a missed one: look again next time
            log.debug("%s: %s: %s", self.storage.uri_of(name), type(e).__name__, e)
            return _UNREADABLE


def _parse(raw: bytes | None) -> dict[str, Any]:
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _report(rank: int, doc: dict[str, Any], silent_s: float, interval: float) -> dict[str, Any]:
    where = f"pid {doc.get('pid')} on {doc.get('host')}" if doc.get("pid") else "its heartbeat object is gone"
    return {
        "rank": rank,
        "error": "RankLostError",
        "message": f"no heartbeat for {silent_s:.1f}s ({where}; beats every {interval:g}s) and neither "
        "its index nor a failure report: the process was killed, its node lost, or it hangs",
    }
