"""The `ckpt` command on s3:// URLs, against the loopback S3 server (tests/seaweed.py).

Credentials and endpoint come from the standard AWS environment, as they would
for a user in a shell: the CLI passes no storage options of its own.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from seaweed import shared_server, stop_shared

import ckpt
from ckpt.cli import main
from ckpt.reader import CheckpointReader


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def s3_server():
    server = shared_server()  # one per session, shared with the other S3 test modules
    yield server
    stop_shared()


@pytest.fixture
def s3_root(s3_server, monkeypatch) -> str:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return f"s3://{s3_server.make_bucket()}/run"


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(300, 200, generator=g), "h": torch.randn(64, 8, generator=g).bfloat16(), "step": seed}


def test_every_subcommand_on_s3(s3_root, tmp_path):
    for step in (10, 20, 30):
        ckpt.save(state(step), f"{s3_root}/step-{step}", step=step, options=ckpt.SaveOptions(chunk_bytes=64 << 10))
    code, out, _ = run("ls", s3_root, "--json")
    assert code == 0 and [e["step"] for e in json.loads(out)] == [10, 20, 30]
    last = f"{s3_root}/step-30"
    assert run("verify", last)[0] == 0
    code, out, _ = run("info", last, "--json")
    assert code == 0 and json.loads(out)["tensors"]["w"]["chunks"] > 1

    hf = f"{s3_root}-export/hf"
    code, _, err = run("export", last, hf, "--to", "safetensors", "--max-shard-size", "100KB")
    assert code == 0, err
    dcp_dir = f"{s3_root}-export/dcp"
    code, _, err = run("export", last, dcp_dir, "--to", "dcp")
    assert code == 0, err
    for src, name in ((hf, "from-hf"), (dcp_dir, "from-dcp")):
        code, _, err = run("convert", src, f"{s3_root}-export/{name}")
        assert code == 0, err
        assert run("diff", last, f"{s3_root}-export/{name}")[0] == 0, name
    code, _, err = run("reshard", last, f"{s3_root}-export/laid", "--for-world", "2")
    assert code == 0, err
    laid = CheckpointReader(f"{s3_root}-export/laid").manifest
    assert laid.topology["laid_out_for"]["world_size"] == 2

    code, out, _ = run("gc", s3_root, "--keep-last", "1", "--yes", "--json")
    assert code == 0 and sorted(e["name"] for e in json.loads(out)["deleted"]) == ["step-10", "step-20"]
    code, out, _ = run("ls", s3_root, "--json")
    assert [e["name"] for e in json.loads(out)] == ["step-30"]
    code, _, err = run("verify", f"{s3_root}/step-10")
    assert code == 2 and "step-10" in err
