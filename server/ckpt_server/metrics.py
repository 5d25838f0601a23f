"""Counters of the daemon, exposed in Prometheus text format."""

from __future__ import annotations

import threading
from collections import defaultdict


class Metrics:
    """Thread-safe counters and gauges; ``render()`` gives the exposition text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_persisted = 0
        self.jobs = defaultdict(int)  # status -> count
        self.phase_seconds: dict[str, float] = defaultdict(float)
        self.queue_depth = 0
        self.bytes_held = 0

    def job_started(self, nbytes: int) -> None:
        with self._lock:
            self.queue_depth += 1
            self.bytes_held += nbytes

    def job_finished(self, nbytes: int, ok: bool, timings: dict[str, float]) -> None:
        with self._lock:
            self.queue_depth -= 1
            self.bytes_held -= nbytes
            self.jobs["ok" if ok else "failed"] += 1
            if ok:
                self.bytes_persisted += nbytes
            for phase, s in timings.items():
                self.phase_seconds[phase] += s

    def render(self, ram_tier_bytes: int = 0) -> str:
        with self._lock:
            lines = [
                "# HELP ckpt_bytes_persisted_total Bytes of checkpoint data made durable.",
                "# TYPE ckpt_bytes_persisted_total counter",
                f"ckpt_bytes_persisted_total {self.bytes_persisted}",
                "# HELP ckpt_jobs_total Persist jobs finished, by outcome.",
                "# TYPE ckpt_jobs_total counter",
                *(f'ckpt_jobs_total{{status="{s}"}} {n}' for s, n in sorted(self.jobs.items())),
                "# HELP ckpt_failures_total Persist jobs that failed.",
                "# TYPE ckpt_failures_total counter",
                f"ckpt_failures_total {self.jobs.get('failed', 0)}",
                "# HELP ckpt_phase_seconds_total Seconds spent per persist phase.",
                "# TYPE ckpt_phase_seconds_total counter",
                *(f'ckpt_phase_seconds_total{{phase="{p}"}} {s:.6f}' for p, s in sorted(self.phase_seconds.items())),
                "# HELP ckpt_queue_depth Persist jobs accepted and not yet finished.",
                "# TYPE ckpt_queue_depth gauge",
                f"ckpt_queue_depth {self.queue_depth}",
                "# HELP ckpt_bytes_held Bytes of snapshots the daemon holds (mapped or buffered).",
                "# TYPE ckpt_bytes_held gauge",
                f"ckpt_bytes_held {self.bytes_held}",
                "# HELP ckpt_ram_tier_bytes Bytes of committed checkpoints kept in memory for fast restore.",
                "# TYPE ckpt_ram_tier_bytes gauge",
                f"ckpt_ram_tier_bytes {ram_tier_bytes}",
            ]
        return "\n".join(lines) + "\n"
