"""Start-up time of the ``ckpt`` command: ``--help``, ``ls`` and ``info`` should answer in under 0.3 s.

Builds a run root with two small checkpoints (``ckpt.Manager``), then runs each command
--repeats times as a fresh interpreter (``python -c`` calling ``ckpt.cli.main``, what the
console script does) and reports the median and fastest wall time, and whether the command
imported torch (it must not: torch alone takes seconds to import). ``import torch`` is
timed the same way for scale.

    .venv/bin/python bench/bench_cli_startup.py --repeats 10
"""

from __future__ import annotations

import argparse
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


def time_command(args: list[str], repeats: int) -> tuple[list[float], bool]:
    times, imported_torch = [], False
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"ckpt {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        imported_torch |= "TORCH=1" in done.stderr
    return times, imported_torch


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
        print(f"{'command':<22} {'median s':>9} {'min s':>7}  torch imported  (target < {TARGET_S} s)")
        for name, args in commands.items():
            times, torch_imported = time_command(args, opts.repeats)
            print(f"{name:<22} {statistics.median(times):9.3f} {min(times):7.3f}  {'yes' if torch_imported else 'no'}")
        times = []
        for _ in range(opts.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch"], check=True)
            times.append(time.perf_counter() - start)
        print(f"{'(import torch)':<22} {statistics.median(times):9.3f} {min(times):7.3f}")


if __name__ == "__main__":
    main()
