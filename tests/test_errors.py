"""Every error a user can catch is a CheckpointError exported from ckpt and listed in the README;
storage failures (missing S3 credentials included) are typed and name the URI and operation."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt import CheckpointError, StorageOperationError


def library_errors() -> set[type]:
    found = set()
    for info in pkgutil.walk_packages(ckpt.__path__, "ckpt."):
        if info.name.startswith(("ckpt.demo", "ckpt._proto", "ckpt.cli")):
            continue  # the demo's and the CLI's own errors never reach library users
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, CheckpointError) and cls.__module__.startswith("ckpt"):
                found.add(cls)
    return found


def test_every_error_class_is_exported_and_documented():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for cls in library_errors():
        assert getattr(ckpt, cls.__name__, None) is cls, f"{cls.__module__}.{cls.__name__} is not exported"
        assert cls.__name__ in ckpt.__all__ and f"`{cls.__name__}`" in readme, cls.__name__


def test_missing_s3_credentials_name_the_uri_and_operation(monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = ckpt.LoadOptions(storage_options={"endpoint_url": "http://127.0.0.1:9", "retry": {"max_attempts": 1}})
    with pytest.raises(StorageOperationError) as raised:
        ckpt.load({"w": torch.zeros(1)}, "s3://bucket/run/c", options=options)
    err = raised.value
    assert isinstance(err, OSError) and err.target == "s3://bucket/run/c/manifest.json" and err.operation
    assert str(err).startswith(f"s3://bucket/run/c/manifest.json: {err.operation} failed")
    assert "NoCredentialsError" in str(err) and "AWS_ACCESS_KEY_ID" in str(err)
