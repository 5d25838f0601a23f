"""The daemon's RAM tier: the latest committed checkpoint of each job, in tmpfs.

A job is the directory a checkpoint lives in (``.../run1`` for
``.../run1/step-00000100``): when a newer checkpoint of the same job commits,
the older copy goes. A byte budget bounds the tier; the least recently
committed jobs are evicted first.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, field

from ckpt.ramtier import copy_dir


@dataclass
class Copy:
    uri: str
    save_id: str
    directory: str
    objects: dict[str, int] = field(default_factory=dict)  # name -> bytes
    seq: int = 0

    @property
    def nbytes(self) -> int:
        return sum(self.objects.values())


def job_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


class RamTier:
    def __init__(self, base: str, budget: int | None) -> None:
        self.base, self.budget = base, budget
        os.makedirs(base, mode=0o700, exist_ok=True)
        self._copies: dict[str, Copy] = {}  # job -> its latest copy
        self._lock = threading.Lock()
        self._seq = 0

    def directory(self, uri: str) -> str:
        return copy_dir(self.base, uri)

    def admits(self, nbytes: int) -> bool:
        """Whether a snapshot of this size may be mirrored at all."""
        return self.budget is None or nbytes <= self.budget

    def record(self, uri: str, save_id: str, objects: dict[str, int]) -> None:
        """A rank's objects of a committed save are in memory: make them findable."""
        job = job_of(uri)
        with self._lock:
            self._seq += 1
            current = self._copies.get(job)
            if current is None or current.uri != uri or current.save_id != save_id:
                if current is not None and current.uri != uri:
                    self._drop(current)
                current = Copy(uri, save_id, self.directory(uri))
                self._copies[job] = current
            current.objects.update(objects)
            current.seq = self._seq
            self._enforce_budget(keep=job)

    def lookup(self, uri: str) -> Copy | None:
        with self._lock:
            copy = self._copies.get(job_of(uri))
            return copy if copy is not None and copy.uri == uri else None

    def clear(self) -> int:
        with self._lock:
            freed = sum(c.nbytes for c in self._copies.values())
            for c in list(self._copies.values()):
                self._drop(c)
            self._copies.clear()
            return freed

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for c in self._copies.values())

    def _enforce_budget(self, keep: str) -> None:
        if self.budget is None:
            return
        total = sum(c.nbytes for c in self._copies.values())
        for job, copy in sorted(self._copies.items(), key=lambda jc: jc[1].seq):
            if total <= self.budget:
                return
            if job == keep:
                continue
            total -= copy.nbytes
            self._drop(copy)
            del self._copies[job]
        if total > self.budget:  # the newest alone is too big
            self._drop(self._copies.pop(keep))

    @staticmethod
    def _drop(copy: Copy) -> None:
        shutil.rmtree(copy.directory, ignore_errors=True)
