"""``ckpt --help``, ``ls`` and ``info`` of local paths never import torch (it alone takes seconds to
import) nor fsspec (a tenth of a second); their start-up time is measured by bench/bench_cli_startup.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ckpt

PROBE = (
    "import sys; from ckpt.cli import main\n"
    "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
    "heavy = [m for m in ('torch', 'numpy', 'fsspec') if m in sys.modules]\n"
    "assert not heavy, heavy\nsys.exit(rc)"
)


@pytest.mark.dist  # starts fresh interpreters (the nearest process marker; none says "subprocess")
def test_help_ls_and_info_import_no_torch_nor_fsspec(tmp_path):
    root = tmp_path / "run"
    manager = ckpt.Manager(str(root), handle_sigterm=False)
    manager.save(1, {"w": torch.ones(3), "rng": (1, 2.5, float("nan"))}, metrics={"loss": float("inf")})
    manager.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for args in (["--help"], ["ls", str(root)], ["ls", "--json", str(root)], ["info", str(root / "step-00000001")],
                 ["info", "--json", str(root / "step-00000001")]):
        done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, (args, done.stderr)
        if "--json" in args:  # standard JSON: non-finite floats are typed values, not NaN / Infinity tokens
            assert "NaN" not in done.stdout and "Infinity" not in done.stdout and '"$ckpt": "float"' in done.stdout
