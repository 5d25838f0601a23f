"""Helpers shared by the benchmarks: timing, rates, tables, page cache, spawned ranks.

Benchmarks compare systems on the same data in the same run, so the helpers
favour medians over means, ratios over absolute figures (the machine is shared
and noisy), and spawned gloo ranks that report their timings back to the parent.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

# Rank processes inherit this before they import torch: one intra-op thread per
# rank, so ranks do not fight over the (few) cores with thread pools.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The rank launcher is the tests' own (one launcher for both); like seaweed.py and daemon_util.py it lives in tests/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import dist as _launcher  # noqa: E402

GIB = float(1 << 30)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def gib(nbytes: float) -> float:
    return nbytes / GIB


def rate(nbytes: float, seconds: float) -> float:
    """GiB/s; inf for a zero duration rather than a ZeroDivisionError in a report."""
    return gib(nbytes) / seconds if seconds > 0 else float("inf")


def drop_page_cache() -> bool:
    """Write back dirty pages and drop the page cache, for cold reads.

    Needs root and a writable /proc/sys/vm/drop_caches (often refused in
    containers); returns False instead of raising when it is not possible.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def page_cache_droppable() -> bool:
    """Whether :func:`drop_page_cache` actually empties the cache here.

    A write to drop_caches can succeed and do nothing (some sandboxes), so this
    checks that a freshly written file's pages leave the cache.
    """
    with tempfile.NamedTemporaryFile(dir=tempfile.gettempdir()) as f:
        f.write(os.urandom(8 << 20))
        f.flush()
        os.fsync(f.fileno())
        if not drop_page_cache():
            return False
        return _cached_fraction(f.fileno(), 8 << 20) < 0.5


def _cached_fraction(fd: int, size: int) -> float:
    """Fraction of a file's pages resident in the page cache (mincore on a mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return 1.0
    try:
        n = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * n)()
        if libc.mincore(addr, size, vec) != 0:
            return 1.0
        return sum(v & 1 for v in vec) / n
    finally:
        libc.munmap(addr, size)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: robust to a busy
    machine where wall time is not (it measures work, not waiting)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def io_counters() -> dict[str, int]:
    """This process's cumulative I/O (/proc/self/io): rchar/wchar count every
    read/write syscall byte, read_bytes/write_bytes only those that hit storage."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, v = line.split(":")
                out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats get 3 significant decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join([line, sep, *body])


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the figures: cores, load, versions."""
    import torch

    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def filesystem_of(path: str) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts): a benchmark on
    tmpfs measures memory, not a disk, and should say so."""
    path = os.path.realpath(path)
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mnt, typ = line.split()[:3]
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) > len(best):
                    best, fstype = mnt, typ
    except OSError:
        pass
    return fstype


def write_json(path: str, doc: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def timed_collective(fn: Callable[[], Any]) -> float:
    """Seconds from a barrier before ``fn`` to a barrier after it on every rank:
    the wall time of the slowest rank, as a training job would see it."""
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 1800.0) -> list[Any]:
    """Call ``fn(rank, world, *args)`` on ``world`` spawned gloo CPU ranks; return results by rank.

    The tests' launcher (tests/dist.py: FileStore rendezvous, a failing rank's traceback raised
    here, the others killed) with a timeout sized for benchmark runs.
    """
    return _launcher.run_ranks(fn, world, *args, timeout=timeout)
