"""What every test module shares: this folder on sys.path, a checkpoint location on each
local backend, and the S3 server fixtures."""

import os
import sys
import uuid

import fsspec
import pytest

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
