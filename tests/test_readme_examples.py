"""Every README code block marked ``<!-- tested -->`` runs, in a fresh interpreter and an
empty working directory, so the documented examples cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"<!-- tested -->\n```python\n(.*?)```", re.S)


def examples() -> list[tuple[str, str]]:
    """(the heading above the block, its code) for each marked block."""
    text = README.read_text()
    found = []
    for m in _BLOCK.finditer(text):
        headings = re.findall(r"^#+ (.+)$", text[: m.start()], re.M)
        found.append((headings[-1] if headings else "README", m.group(1)))
    return found


def test_the_readme_marks_examples():
    assert len(examples()) >= 2


@pytest.mark.subprocess
@pytest.mark.parametrize("heading,code", examples(), ids=[h for h, _ in examples()])
def test_readme_example_runs(heading, code, tmp_path):
    for module in re.findall(r"^(?:import|from) (\w+)", code, re.M):
        pytest.importorskip(module)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, f"README example under {heading!r} failed:\n{done.stderr[-3000:]}"
