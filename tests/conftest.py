"""What every test module shares: this folder on sys.path, a checkpoint location on each
local backend, the S3 server fixtures, and the rule that an unmarked test starts no process."""

import ast
import contextlib
import itertools
import multiprocessing.process
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from unittest import mock

import fsspec
import pytest
from _pytest.mark.expression import Expression

# Tests import their rank functions from this folder (tests/dist.py, helpers) in spawned processes.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(params=["file", "memory"])
def any_uri(request, tmp_path):
    """A fresh checkpoint location on the local disk, then in fsspec's in-memory filesystem."""
    if request.param == "file":
        yield str(tmp_path / "c")
        return
    root = f"ckpt-tests/{uuid.uuid4().hex}"
    yield f"memory://{root}/c"
    fsspec.filesystem("memory").rm(root, recursive=True)


@pytest.fixture(scope="session")
def s3_server():
    """One SeaweedFS (tests/seaweed.py) for the whole session, started on first use."""
    from seaweed import shared_server, stop_shared

    server = shared_server()
    yield server
    stop_shared()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh "bucket/prefix" of its own for each test."""
    from seaweed import shared_prefix

    return shared_prefix()


# A test (or a fixture it uses) that starts a process must say so with one of these markers:
# `make test-fast` selects the tests without them and relies on their being pure.
PROCESS_MARKERS = ("dist", "s3", "daemon", "faults", "subprocess")


class UnmarkedProcessError(RuntimeError):
    """A test without a process marker tried to start a process."""


@contextlib.contextmanager
def _processes_refused(item: pytest.Item) -> Iterator[None]:
    if any(item.get_closest_marker(m) for m in PROCESS_MARKERS):
        yield
        return

    def refuse(*args, **kwargs):
        raise UnmarkedProcessError(
            f"{item.nodeid} starts a process but is marked none of {', '.join(PROCESS_MARKERS)} "
            "(pyproject.toml says which fits); `make test-fast` runs it as a pure test"
        )

    with (
        mock.patch.object(subprocess.Popen, "_execute_child", refuse),
        mock.patch.object(multiprocessing.process.BaseProcess, "start", refuse),
    ):
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with _processes_refused(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with _processes_refused(item):
        return (yield)


def _marks_in(path) -> tuple[frozenset[str], frozenset[str]]:
    """(marks of the module's ``pytestmark``, every ``pytest.mark.NAME`` the file names), read
    from its source: the module is not imported."""
    tree = ast.parse(path.read_bytes())
    names = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark"
    }
    module: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            module |= {n.attr for n in ast.walk(node.value) if isinstance(n, ast.Attribute) and n.attr in names}
    return frozenset(module), frozenset(names - module)


def pytest_ignore_collect(collection_path, config):
    """Skip importing a test module no test of which the ``-m`` expression can select (its
    ``pytestmark`` alone rules it out whatever marks its tests add): transformers, deepspeed
    and lightning suites cost seconds to import, which `make test-fast` would pay for nothing."""
    expr = config.getoption("markexpr")
    if not expr or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    module, extra = _marks_in(collection_path)
    if not module:
        return None
    compiled = Expression.compile(expr)
    for k in range(len(extra) + 1):
        for added in itertools.combinations(sorted(extra), k):
            marks = module | set(added)
            if compiled.evaluate(lambda name, marks=marks: name in marks):
                return None
    return True
