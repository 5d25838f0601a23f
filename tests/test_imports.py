"""Every module of ckpt and ckpt_server imports on its own, first: no import cycle that only
works because some other module happened to be imported before it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

# Imports each named module in a forked child of an interpreter that has loaded the heavy
# third-party packages but no module of the packages under test, so every child starts
# from the same import state as a fresh interpreter for the modules that matter, without
# paying torch's import once per module. Prints "FAILED <module>" and the traceback per failure.
CHILD = r"""
import importlib, os, sys, traceback
roots, preload, names = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3:]
for dep in filter(None, preload):
    try:
        importlib.import_module(dep)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.split(".")[0] in roots], "a package under test was imported early"
failed = 0
for name in names:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status and os.WIFSIGNALED(status):
        print(f"FAILED {name}: killed by signal {os.WTERMSIG(status)}", flush=True)
    failed += status != 0
sys.exit(1 if failed else 0)
"""


def modules_of(package: str, root: Path) -> list[str]:
    """Dotted names of every module and package under ``root`` (the directory of ``package``);
    ``__main__`` modules are programs (``python -m``) that run when imported, so they are left out."""
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join([package, *parts]))
    return names


# What ckpt imports that is slow to import (torch.distributed.tensor alone takes seconds).
THIRD_PARTY = [
    "torch",
    "torch.distributed.tensor",
    "torch.distributed.checkpoint",
    "numpy",
    "safetensors",
    "fsspec",
    "xxhash",
    "tqdm",
    "grpc",
    "google.protobuf",
]


def import_each_alone(
    packages: list[str], preload: list[str], pythonpath: Sequence[str] = ()
) -> subprocess.CompletedProcess:
    modules = []
    for package in packages:
        spec = importlib.util.find_spec(package)  # locates without importing
        assert spec is not None and spec.submodule_search_locations, package
        modules += modules_of(package, Path(spec.submodule_search_locations[0]))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*pythonpath, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-c", CHILD, ",".join(packages), ",".join(preload), *modules],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_every_module_imports_alone():
    result = import_each_alone(["ckpt", "ckpt_server"], THIRD_PARTY)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_cycle_is_caught(tmp_path):
    """The check above can fail: a package whose two modules import from each other at the top."""
    pkg = tmp_path / "cyclic"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import B\n\nA = 1\n")
    (pkg / "b.py").write_text("from .a import A\n\nB = 2\n")
    sys.path.insert(0, str(tmp_path))
    try:
        result = import_each_alone(["cyclic"], [], [str(tmp_path)])
    finally:
        sys.path.remove(str(tmp_path))
    assert result.returncode == 1
    assert "FAILED cyclic.a" in result.stdout and "FAILED cyclic.b" in result.stdout
    assert "partially initialized module" in result.stdout


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_import_ckpt_and_the_cli_parser_load_no_torch():
    """`ckpt --help` answers without importing torch (seconds); so does `import ckpt`."""
    out = _run(
        "import contextlib, io, sys\n"
        "import ckpt\n"
        "print('torch' in sys.modules)\n"
        "from ckpt.cli import main\n"
        "for argv in (['--help'], ['--version'], ['gc', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print('torch' in sys.modules)\n"
    )
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("first", ["ckpt.save", "ckpt.load", "ckpt.merge.methods", "ckpt.tree"])
def test_public_names_are_what_they_were_whatever_is_imported_first(first):
    """ckpt.save, ckpt.load and ckpt.merge stay the functions after their modules are imported,
    and every name in ckpt.__all__ is the object its module defines."""
    out = _run(
        f"import importlib, inspect, ckpt, {first}\n"
        "assert all(inspect.isfunction(getattr(ckpt, n)) for n in ('save', 'load', 'merge', 'read'))\n"
        "from ckpt import load, merge, save\n"
        "homes = (save.__module__, load.__module__, merge.__module__)\n"
        "assert homes == ('ckpt.save', 'ckpt.load', 'ckpt.merge.driver'), homes\n"
        "for name in ckpt.__all__:\n"
        "    obj = getattr(ckpt, name)\n"
        "    if name != '__version__':\n"
        "        home = importlib.import_module(ckpt._EXPORTS[name].join(['ckpt.', '']))\n"
        "        assert getattr(home, name) is obj, name\n"
        "assert set(ckpt.__all__) <= set(dir(ckpt))\n"
        "print('ok')\n"
    )
    assert out.strip() == "ok"
