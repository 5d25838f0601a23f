"""ckpt over S3, against a real S3 server (SeaweedFS on loopback, see tests/seaweed.py).

Covers: save / load / reshard on 2 ranks, credentials through storage_options and
through the standard AWS environment, multipart vs single PUT, ranged reads that
fetch only what a region needs, listings that polling can trust, aborted
multipart uploads, and the reader / writer for offline tools.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from faultproxy import FaultProxy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import ckpt
from ckpt.format import MANIFEST
from ckpt.reader import CheckpointReader
from ckpt.storage import open_storage
from ckpt.writer import CheckpointWriter

pytestmark = pytest.mark.s3

MiB = 1 << 20


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(3 * MiB // 4, generator=g),  # 3 MiB of fp32
            "h": torch.randn(257, 129, generator=g).to(torch.bfloat16),
            "ids": torch.randint(0, 1 << 40, (1000,), generator=g),
            "empty": torch.zeros(0, 4),
        },
        "step": 7,
        "lr": 0.25,
    }


def _zeros_like(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out[k] = _zeros_like(v)
        elif isinstance(v, torch.Tensor):
            out[k] = torch.zeros_like(v)
        else:
            out[k] = type(v)()
    return out


def _assert_equal(a: dict, b: dict) -> None:
    for k, v in a.items():
        if isinstance(v, dict):
            _assert_equal(v, b[k])
        elif isinstance(v, torch.Tensor):
            assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k
        else:
            assert v == b[k], k


def test_save_load_with_storage_options(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/run/step-1"
    opts = s3_server.storage_options()
    sd = _state()
    ckpt.save(sd, uri, step=1, options=ckpt.SaveOptions(storage_options=opts))
    got = _zeros_like(sd)
    manifest = ckpt.load(got, uri, options=ckpt.LoadOptions(storage_options=opts))
    _assert_equal(sd, got)
    assert manifest.step == 1
    names = open_storage(uri, **opts).listdir("")
    assert MANIFEST in names and "data" in names


def test_credentials_and_endpoint_from_aws_environment(s3_server, s3_bucket, monkeypatch):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    uri = f"s3://{s3_bucket}/env/step-2"
    sd = _state(1)
    ckpt.save(sd, uri)  # no storage_options at all: botocore reads the environment
    got = _zeros_like(sd)
    ckpt.load(got, uri)
    _assert_equal(sd, got)
    assert torch.equal(CheckpointReader(uri).read("model.w"), sd["model"]["w"])


def test_wrong_credentials_fail_at_once_naming_the_location(s3_server, s3_bucket):
    opts = {**s3_server.storage_options(), "secret": "not-the-secret"}
    with pytest.raises(PermissionError):
        ckpt.load({"x": torch.zeros(1)}, f"s3://{s3_bucket}/nothing", options=ckpt.LoadOptions(storage_options=opts))


def test_missing_checkpoint_is_not_found(s3_server, s3_bucket):
    opts = s3_server.storage_options()
    with pytest.raises(ckpt.CheckpointNotFoundError, match=s3_bucket):
        ckpt.load({"x": torch.zeros(1)}, f"s3://{s3_bucket}/absent", options=ckpt.LoadOptions(storage_options=opts))


def test_large_objects_go_multipart_small_ones_single_put(s3_server, s3_bucket):
    """Part size and concurrency are s3fs's own options; the proxy log shows the requests."""
    with FaultProxy(s3_server.endpoint_url) as proxy:
        opts = {
            **s3_server.storage_options(endpoint_url=proxy.endpoint_url),
            "default_block_size": 5 * MiB,
            "max_concurrency": 3,
        }
        uri = f"s3://{s3_bucket}/mp/step-1"
        big = torch.randn(23 * MiB // 4)  # 23 MiB: 5 parts of 5 MiB
        ckpt.save({"big": big, "small": torch.arange(3)}, uri, options=ckpt.SaveOptions(storage_options=opts))
        data_puts = proxy.entries(op="UploadPart", path="/data/")
        assert len(data_puts) == 5 and all(e.status == 200 for e in data_puts)
        assert len(proxy.entries(op="CreateMultipartUpload")) == 1
        assert len(proxy.entries(op="CompleteMultipartUpload")) == 1
        manifest_puts = proxy.entries(path=f"/{MANIFEST}")
        assert [e.op for e in manifest_puts if e.method == "PUT"] == ["PutObject"]
        assert not proxy.entries(op="PutObject", path="/data/")
    got = {"big": torch.zeros_like(big), "small": torch.zeros(3, dtype=torch.int64)}
    ckpt.load(got, uri, options=ckpt.LoadOptions(storage_options=s3_server.storage_options()))
    assert torch.equal(got["big"], big) and torch.equal(got["small"], torch.arange(3))
    assert s3_server.open_uploads(s3_bucket) == []


def test_reads_are_ranged_and_only_what_a_region_needs(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/ranged/step-1"
    full = torch.randn(1024, 2048)  # 8 MiB, stored as chunks of 1 MiB
    opts = s3_server.storage_options()
    ckpt.save({"w": full}, uri, options=ckpt.SaveOptions(chunk_bytes=MiB, block_bytes=256 << 10, storage_options=opts))
    with FaultProxy(s3_server.endpoint_url) as proxy:
        popts = s3_server.storage_options(endpoint_url=proxy.endpoint_url)
        reader = CheckpointReader(uri, ckpt.LoadOptions(storage_options=popts))
        box = ckpt.Box((300, 0), (10, 2048))  # 80 KiB inside one stored chunk
        assert torch.equal(reader.read("w", box), full[300:310])
        gets = proxy.entries(op="GetObject", path="/data/")
        assert gets and all(e.range and e.range.startswith("bytes=") for e in gets)
        assert sum(e.response_bytes for e in gets) <= 256 << 10  # one checksum block, not the object

        proxy.clear()
        got = {"w": torch.zeros_like(full)}
        ckpt.load(got, uri, options=ckpt.LoadOptions(storage_options=popts))
        assert torch.equal(got["w"], full)
        gets = proxy.entries(op="GetObject", path="/data/")
        assert all(e.range for e in gets)
        stored = open_storage(uri, **opts).size(next(iter(reader.manifest.objects)))
        assert sum(e.response_bytes for e in gets) <= stored  # every byte fetched once at most


def test_listing_and_exists_see_objects_written_by_another_client(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/poll"
    opts = s3_server.storage_options()
    watcher = open_storage(uri, **opts)
    other = open_storage(uri, **opts, skip_instance_cache=True)  # another process, in effect
    assert watcher.listdir("_staging/x") == [] and not watcher.exists("_staging/x/rank-00000.json")
    other.put_atomic("_staging/x/rank-00000.json", b"{}")
    assert watcher.listdir("_staging/x") == ["rank-00000.json"]
    assert watcher.exists("_staging/x/rank-00000.json")
    other.delete("_staging/x/rank-00000.json")
    assert not watcher.exists("_staging/x/rank-00000.json")
    assert watcher.listdir("_staging/x") == []


def test_put_if_absent_creates_once_with_one_winner_among_racing_writers(s3_server, s3_bucket):
    """SeaweedFS honours ``If-None-Match: *`` on PutObject: a second create is refused, the first stays."""
    uri = f"s3://{s3_bucket}/cond"
    opts = s3_server.storage_options()
    storage = open_storage(uri, **opts)
    assert storage.put_if_absent("a/LOCK", b"first") is True
    assert storage.put_if_absent("a/LOCK", b"second") is False
    assert storage.read_bytes("a/LOCK") == b"first"

    writers = [open_storage(uri, **opts, skip_instance_cache=True) for _ in range(6)]  # separate clients
    for r in range(5):
        won: list[int] = []
        barrier = threading.Barrier(len(writers))

        def put(i: int, rel: str = f"race/{r}", won: list[int] = won, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            if writers[i].put_if_absent(rel, f"writer {i}".encode()):
                won.append(i)

        threads = [threading.Thread(target=put, args=(i,)) for i in range(len(writers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, (r, won)
        assert storage.read_bytes(f"race/{r}") == f"writer {won[0]}".encode()


def test_overwrite_replaces_data_and_drops_old_objects(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/ow/latest"
    opts = s3_server.storage_options()
    first, second = _state(2), _state(3)
    ckpt.save(first, uri, options=ckpt.SaveOptions(storage_options=opts))
    storage = open_storage(uri, **opts)
    old_objects = set(storage.listdir("data"))
    with pytest.raises(ckpt.CheckpointExistsError):
        ckpt.save(second, uri, options=ckpt.SaveOptions(storage_options=opts))
    ckpt.save(second, uri, options=ckpt.SaveOptions(storage_options=opts, overwrite=True))
    got = _zeros_like(second)
    ckpt.load(got, uri, options=ckpt.LoadOptions(storage_options=opts))
    _assert_equal(second, got)
    assert not old_objects & set(storage.listdir("data"))


def test_failed_streaming_write_aborts_its_multipart_upload(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/abort/step-1"
    opts = {**s3_server.storage_options(), "default_block_size": 5 * MiB}
    with pytest.raises(RuntimeError, match="producer died"):
        with CheckpointWriter(uri, ckpt.SaveOptions(chunk_bytes=4 * MiB, storage_options=opts)) as w:
            with w.tensor_stream("big", (6, MiB), torch.float32) as stream:
                for i, _box in enumerate(stream.boxes):
                    if i == 4:  # 16 MiB sent: three parts are up
                        raise RuntimeError("producer died")
                    stream.send(torch.full((1, MiB), float(i)))
    assert s3_server.open_uploads(s3_bucket) == []
    storage = open_storage(uri, **opts)
    assert not storage.exists(MANIFEST)
    assert storage.listdir("data") == []  # nothing was published under the object's key


def test_writer_and_reader_with_storage_options(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/offline/merged"
    opts = {**s3_server.storage_options(), "default_block_size": 5 * MiB}
    big = torch.randn(3, 3 * MiB)
    with CheckpointWriter(uri, ckpt.SaveOptions(chunk_bytes=4 * MiB, storage_options=opts)) as w:
        w.write_tensor("small", torch.arange(10))
        with w.tensor_stream("big", tuple(big.shape), big.dtype) as stream:
            for box in stream.boxes:
                stream.send(big[box.slices()])
        w.set_value("note", "hello")
        w.commit(step=5)
    reader = CheckpointReader(uri, ckpt.LoadOptions(storage_options=opts))
    assert reader.manifest.step == 5 and reader.values["note"] == "hello"
    assert torch.equal(reader.read("big"), big)
    assert torch.equal(reader.read("small"), torch.arange(10))
    assert reader.verify() == []


def _save_then_reshard_load(rank: int, world: int, uri: str, opts: dict, env: dict) -> None:
    """Save Shard(0)/Shard(1) DTensors, then load them back laid out the other way.

    The save passes credentials as storage_options; the load finds them in the
    standard AWS environment (as a job configured by its launcher would).
    """
    torch.manual_seed(0)
    full = torch.randn(64, 33)
    emb = torch.randn(50, 16).to(torch.bfloat16)
    mesh = init_device_mesh("cpu", (world,))
    sd = {
        "w": distribute_tensor(full, mesh, [Shard(0)]),
        "emb": distribute_tensor(emb, mesh, [Shard(1)]),
        "rep": torch.arange(9),
        "step": 11,
    }
    ckpt.save(sd, uri, step=11, options=ckpt.SaveOptions(storage_options=opts))
    dist.barrier()
    os.environ.update(env)
    target = {
        "w": distribute_tensor(torch.zeros(64, 33), mesh, [Shard(1)]),
        "emb": distribute_tensor(torch.zeros(50, 16, dtype=torch.bfloat16), mesh, [Shard(0)]),
        "rep": torch.zeros(9, dtype=torch.int64),
        "step": 0,
    }
    ckpt.load(target, uri)
    assert torch.equal(target["w"].full_tensor(), full)
    assert torch.equal(target["emb"].full_tensor(), emb)
    assert torch.equal(target["rep"], torch.arange(9)) and target["step"] == 11


@pytest.mark.dist
def test_two_ranks_save_and_reshard_load(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/dist/step-11"
    opts = s3_server.storage_options()
    run_ranks(_save_then_reshard_load, 2, uri, opts, s3_server.env())
    assert s3_server.open_uploads(s3_bucket) == []
    from ckpt.storage import open_storage

    st = open_storage(uri, **opts)
    left = {d: st.listdir(f"_staging/{d}") for d in st.listdir("_staging")}
    assert left == {}, left  # indexes and heartbeats cleaned up
    torch.manual_seed(0)
    full = torch.randn(64, 33)
    one = {"w": torch.zeros(64, 33)}  # and on one process, whole
    ckpt.load(one, uri, strict=False, options=ckpt.LoadOptions(storage_options=opts))
    assert torch.equal(one["w"], full)


def test_incremental_compressed_saves_retention_and_gc_on_s3(s3_server, s3_bucket):
    """Object stores have no '..': referenced objects are read through the run root; retention
    retires a referenced checkpoint and frees it once nothing references it."""
    from ckpt.catalog import EntryStatus, scan
    from ckpt.options import Compression, RetentionPolicy

    root = f"s3://{s3_bucket}/run"
    opts = s3_server.storage_options()
    m = ckpt.Manager(root, storage_options=opts, incremental=True, retention=RetentionPolicy(keep_last=1),
                     save_options=ckpt.SaveOptions(compression=Compression()), handle_sigterm=False)
    sd = _state()
    for step in (1, 2, 3):
        sd["step"] = step
        m.save(step, sd)
        m.wait()
    assert {e.name: e.status for e in scan(root, opts)} == {
        "step-00000001": EntryStatus.RETIRED, "step-00000003": EntryStatus.COMPLETE
    }
    reader = CheckpointReader(f"{root}/step-00000003", ckpt.LoadOptions(storage_options=opts))
    h = reader.manifest.tensors["model.h"].chunks[0]
    assert h.object.startswith("../step-00000001/") and h.codec is not None
    got = _zeros_like(sd)
    ckpt.load(got, f"{root}/step-00000003", options=ckpt.LoadOptions(storage_options=opts))
    _assert_equal(sd, got)
    for key in ("h", "w", "ids"):  # every chunk of 4 KiB or more changes: nothing references step 1 now
        sd["model"][key] += 1
    m.save(4, sd)
    m.close()
    assert [e.name for e in scan(root, opts)] == ["step-00000004"]
    got = _zeros_like(sd)
    ckpt.load(got, f"{root}/step-00000004", options=ckpt.LoadOptions(storage_options=opts))
    _assert_equal(sd, got)
