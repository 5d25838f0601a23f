"""What every test module shares: this folder on sys.path, and the S3 server fixtures."""

import os
import sys

import pytest

# Tests import their rank functions from this folder (tests/dist.py, helpers) in spawned processes.
sys.path.insert(0, os.path.dirname(__file__))


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
