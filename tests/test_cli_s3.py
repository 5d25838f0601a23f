"""The `ckpt` command on s3:// URLs, against the loopback S3 server (tests/seaweed.py).

Credentials and endpoint come from the standard AWS environment, as they would
for a user in a shell: the CLI passes no storage options of its own.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import run_cli

import ckpt
import ckpt.storage
from ckpt.reader import CheckpointReader

pytestmark = pytest.mark.s3


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
    code, out, _ = run_cli("ls", s3_root, "--json")
    assert code == 0 and [e["step"] for e in json.loads(out)] == [10, 20, 30]
    last = f"{s3_root}/step-30"
    assert run_cli("verify", last)[0] == 0
    code, out, _ = run_cli("info", last, "--json")
    assert code == 0 and json.loads(out)["tensors"]["w"]["chunks"] > 1

    hf = f"{s3_root}-export/hf"
    code, _, err = run_cli("export", last, hf, "--to", "safetensors", "--max-shard-size", "100KB")
    assert code == 0, err
    dcp_dir = f"{s3_root}-export/dcp"
    code, _, err = run_cli("export", last, dcp_dir, "--to", "dcp")
    assert code == 0, err
    for src, name in ((hf, "from-hf"), (dcp_dir, "from-dcp")):
        code, _, err = run_cli("convert", src, f"{s3_root}-export/{name}")
        assert code == 0, err
        assert run_cli("diff", last, f"{s3_root}-export/{name}")[0] == 0, name
    code, _, err = run_cli("reshard", last, f"{s3_root}-export/laid", "--for-world", "2")
    assert code == 0, err
    laid = CheckpointReader(f"{s3_root}-export/laid").manifest
    assert laid.topology["laid_out_for"]["world_size"] == 2

    code, out, _ = run_cli("gc", s3_root, "--keep-last", "1", "--yes", "--json")
    assert code == 0 and sorted(e["name"] for e in json.loads(out)["deleted"]) == ["step-10", "step-20"]
    code, out, _ = run_cli("ls", s3_root, "--json")
    assert [e["name"] for e in json.loads(out)] == ["step-30"]
    code, _, err = run_cli("verify", f"{s3_root}/step-10")
    assert code == 2 and "step-10" in err


def _start_upload(server, root: str, key: str) -> None:
    """What a writer killed mid-object leaves: a multipart upload with a part, never completed."""
    import s3fs

    bucket, prefix = root.removeprefix("s3://").split("/", 1)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options())
    uid = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{prefix}/{key}")["UploadId"]
    fs.call_s3("upload_part", Bucket=bucket, Key=f"{prefix}/{key}", UploadId=uid, PartNumber=1, Body=b"x" * 1024)


def test_gc_aborts_the_uploads_of_killed_writers_and_keeps_a_save_in_flight(s3_root, s3_server):
    ckpt.save(state(1), f"{s3_root}/step-1", step=1)
    ckpt.save(state(2), f"{s3_root}/step-2", step=2)
    # step-0: a save killed mid-upload (a rank's index landed, rank 0's object never did)
    with ckpt.storage.open_storage(f"{s3_root}/step-0").open_write("_staging/dead/rank-00001.json") as f:
        f.write(b"{}")
    _start_upload(s3_server, s3_root, "step-0/data/dead-r00000.safetensors")
    _start_upload(s3_server, s3_root, "step-3/data/live-r00000.safetensors")  # a save in flight right now
    both = ["step-0/data/dead-r00000.safetensors", "step-3/data/live-r00000.safetensors"]
    assert s3_server.open_uploads(s3_root) == both

    code, out, _ = run_cli("gc", s3_root, "--json")  # dry run: reports, touches nothing
    report = json.loads(out)
    assert code == 0 and [u["key"] for u in report["would_abort_uploads"]] == [both[0]]
    assert [e["name"] for e in report["would_delete"]] == ["step-0"]
    assert s3_server.open_uploads(s3_root) == both

    code, out, _ = run_cli("gc", s3_root, "--yes", "--json")
    assert code == 0 and [u["key"] for u in json.loads(out)["aborted_uploads"]] == [both[0]]
    assert s3_server.open_uploads(s3_root) == [both[1]], "the in-flight save's upload must survive"

    time.sleep(1.1)  # S3 start times have one-second resolution
    code, out, _ = run_cli("gc", s3_root, "--yes", "--abort-uploads-after", "0", "--json")
    assert code == 0 and [u["key"] for u in json.loads(out)["aborted_uploads"]] == [both[1]]
    assert s3_server.open_uploads(s3_root) == []
    code, out, _ = run_cli("ls", s3_root, "--json")
    assert [e["name"] for e in json.loads(out)] == ["step-1", "step-2"]
