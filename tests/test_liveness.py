"""Telling a dead rank from a slow one by its heartbeat, on the reader's own clock (no processes).

A clock the test advances stands in for time: a heartbeat unchanged for 5 intervals over 5 looks
is stale; one that changes, one never seen, one that cannot be read, and a reader that was itself
paused (it looked only twice) are not.
"""

from __future__ import annotations

import json
import time

import pytest

from ckpt import liveness
from ckpt.liveness import HEARTBEAT_MISSES, Heartbeat, Watch, heartbeat_name
from ckpt.storage import open_storage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(liveness.time, "monotonic", c)
    return c


def beat(storage, rank: int, n: int, world: int = 2, interval: float = 1.0) -> None:
    doc = {"rank": rank, "pid": 4242, "host": "node7", "interval_s": interval, "beat": n}
    storage.put_transient(heartbeat_name("s-1", rank, world), json.dumps(doc).encode())


def look(watch: Watch, clock: Clock, ranks, step: float = 1.0) -> list[dict]:
    clock.now += step
    return watch.lost(ranks)


def test_a_heartbeat_that_stops_is_stale_after_five_intervals_naming_rank_pid_and_host(tmp_path, clock):
    storage = open_storage(str(tmp_path))
    watch = Watch(storage, "s-1", 2)
    beat(storage, 1, 0)
    assert watch.lost([1]) == []  # first seen
    found = []
    for _ in range(HEARTBEAT_MISSES):
        found = look(watch, clock, [1])
    assert [f["rank"] for f in found] == [1] and found[0]["error"] == "RankLostError"
    assert "no heartbeat for 5.0s (pid 4242 on node7; beats every 1s)" in found[0]["message"]


def test_a_beating_rank_a_rank_never_seen_and_an_unreadable_heartbeat_are_not_stale(tmp_path, clock, monkeypatch):
    storage = open_storage(str(tmp_path))
    watch = Watch(storage, "s-1", 2)
    for n in range(20):  # rank 1 beats every look; rank 0 never wrote one
        beat(storage, 1, n)
        assert look(watch, clock, [0, 1]) == []
    beat(storage, 1, 99)
    assert look(watch, clock, [1]) == []
    monkeypatch.setattr(storage, "read_bytes", lambda rel: (_ for _ in ()).throw(OSError("EIO")))
    for _ in range(3 * HEARTBEAT_MISSES):  # unreadable is neither a beat nor a missed one
        assert look(watch, clock, [1]) == []


def test_a_reader_that_was_paused_does_not_count_its_own_pause(tmp_path, clock):
    storage = open_storage(str(tmp_path))
    watch = Watch(storage, "s-1", 2)
    beat(storage, 1, 0)
    assert watch.lost([1]) == []
    assert look(watch, clock, [1], step=60.0) == []  # one look after a minute: not yet 5 looks
    for _ in range(HEARTBEAT_MISSES - 2):
        assert look(watch, clock, [1]) == []
    assert [f["rank"] for f in look(watch, clock, [1])] == [1]


def test_looks_are_spaced_by_the_writers_interval(tmp_path, clock):
    storage = open_storage(str(tmp_path))
    watch = Watch(storage, "s-1", 2)
    beat(storage, 1, 0, interval=4.0)
    watch.lost([1])
    reads = []
    real = storage.read_bytes
    storage.read_bytes = lambda rel: reads.append(rel) or real(rel)
    for _ in range(40):  # 40 polls over 10 s: a look every 4 s
        look(watch, clock, [1], step=0.25)
    assert len(reads) == 2


def test_heartbeat_thread_rewrites_its_object_until_stopped(tmp_path):
    storage = open_storage(str(tmp_path))
    hb = Heartbeat(storage, "s-1", 3, 100, 0.01).start()
    name = heartbeat_name("s-1", 3, 100)
    assert name == "_staging/s-1/03/rank-00003.alive"
    seen = set()
    deadline = time.monotonic() + 10
    while len(seen) < 3 and time.monotonic() < deadline:
        try:
            seen.add(json.loads(storage.read_bytes(name))["beat"])
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    hb.stop()
    assert len(seen) >= 3
    last = storage.read_bytes(name)
    time.sleep(0.05)
    assert storage.read_bytes(name) == last  # no beat after stop() returned
