"""Start-up time of the ``ckpt`` command: ``--help``, ``ls`` and ``info`` should answer in under 0.3 s.

Builds a run root with two small checkpoints (``ckpt.Manager``), then runs each command
--repeats times as a fresh interpreter (``python -c`` calling ``ckpt.cli.main``, what the
console script does) and reports the median and fastest wall time, the median CPU time
(user + system of the child: what the command costs, close to its wall time on an idle machine
and far less inflated than wall time on a busy one), and whether the command imported torch
(it must not: torch alone takes seconds to import). ``python -c pass`` and ``import torch`` are
timed the same way for scale.

    .venv/bin/python bench/bench_cli_startup.py --repeats 10
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 0.3
PROBE = (
    "import sys; from ckpt.cli import main; rc = main(sys.argv[1:]); "
    "sys.stderr.write('\\nTORCH=%d\\n' % ('torch' in sys.modules)); sys.exit(rc)"
)


def make_root(root: Path) -> None:
    import torch

    import ckpt

    manager = ckpt.Manager(str(root), handle_sigterm=False)
    for step in (100, 200):
        state = {"model": {f"layer{i}.weight": torch.randn(64, 64) for i in range(8)}, "step": step}
        manager.save(step, state, metrics={"loss": 1.0 / step})
    manager.close()


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_command(argv: list[str], repeats: int) -> tuple[list[float], list[float], bool]:
    """Wall and CPU seconds of each run of ``python argv``, and whether any run imported torch."""
    walls, cpus, imported_torch = [], [], False
    for _ in range(repeats):
        cpu, start = _child_cpu(), time.perf_counter()
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        cpus.append(_child_cpu() - cpu)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
        imported_torch |= "TORCH=1" in done.stderr
    return walls, cpus, imported_torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        make_root(root)
        commands = {
            "ckpt --help": ["--help"],
            "ckpt ls ROOT": ["ls", str(root)],
            "ckpt ls --json ROOT": ["ls", "--json", str(root)],
            "ckpt info CKPT": ["info", str(root / "step-00000200")],
        }
        load = os.getloadavg()[0]
        print(f"load average {load:.1f} on {os.cpu_count()} cores; target: under {TARGET_S} s on an idle machine")
        print(f"{'command':<22} {'wall median':>11} {'wall min':>9} {'CPU median':>11}  torch imported")
        runs = {name: ["-c", PROBE, *args] for name, args in commands.items()}
        runs["(python -c pass)"] = ["-c", "pass"]
        runs["(import torch)"] = ["-c", "import torch"]
        for name, argv in runs.items():
            walls, cpus, torch_imported = time_command(argv, opts.repeats)
            shown = "" if name.startswith("(") else ("yes" if torch_imported else "no")
            print(
                f"{name:<22} {statistics.median(walls):11.3f} {min(walls):9.3f} "
                f"{statistics.median(cpus):11.3f}  {shown}"
            )


if __name__ == "__main__":
    main()
