"""The storage backends (local disk, generic fsspec) and the wrappers that implement the same protocol.

S3's conditional put runs against SeaweedFS in test_s3.py and test_s3_faults.py.
"""

from __future__ import annotations

import json
import os
import threading
import uuid

import fsspec
import pytest

from ckpt.errors import TruncatedObjectError
from ckpt.ramtier import RamTierStorage, TeeStorage
from ckpt.storage import (
    ConditionalPutUnsupportedError,
    FsspecStorage,
    LocalStorage,
    S3Storage,
    Storage,
    open_storage,
)
from ckpt.storage.retry import RetryPolicy


@pytest.fixture
def mem_uri():
    root = f"ckpt-tests/{uuid.uuid4().hex}"
    yield f"memory://{root}/c"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_open_storage_picks_the_backend_by_uri(tmp_path):
    for uri in (str(tmp_path / "a"), f"file://{tmp_path}/a"):
        s = open_storage(uri)
        assert type(s) is LocalStorage and not s.is_remote and s.supports_mapping and s.supports_put_if_absent
        assert s.local_path("x/y") == f"{tmp_path}/a/x/y"
    mem = open_storage("memory://ckpt-tests/pick")  # opening creates nothing
    assert type(mem) is FsspecStorage and mem.is_remote and not mem.supports_mapping
    assert mem.local_path("x") is None and not mem.supports_put_if_absent
    s3 = open_storage("s3://bucket/prefix", key="k", secret="s", endpoint_url="http://127.0.0.1:9")  # no request
    assert type(s3) is S3Storage and s3.is_remote and s3.supports_put_if_absent and s3.local_path("x") is None
    with pytest.raises(ValueError, match="not a local path"):
        LocalStorage("memory://ckpt-tests/pick")


def test_local_backend_answers_as_fsspecs_local_filesystem(tmp_path, monkeypatch):
    """LocalStorage is built on os alone (the CLI never imports fsspec for a local path), yet tools
    walk its ``fs`` at its ``root``: both must name the same paths and answer the same."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for uri in ("run", "./run", "run/", ".", "~/run", "file://run", f"file://{tmp_path}/run/", f"{tmp_path}//run"):
        local = open_storage(uri)
        assert type(local) is LocalStorage and local.root == FsspecStorage(uri).root, uri
        assert local.fs._strip_protocol(local.path("x")) == local.path("x")
    local, ref = open_storage(str(tmp_path / "run")), FsspecStorage(f"file://{tmp_path}/run")
    local.put_atomic("step-1/manifest.json", b"0123456789")
    local.put_atomic("step-1/data/o", b"")
    os.mkdir(tmp_path / "run" / "empty")
    for rel in ("", "step-1", "step-1/manifest.json", "step-1/data", "empty", "missing"):
        assert local.listdir(rel) == ref.listdir(rel), rel
        assert (local.exists(rel), local.is_dir(rel)) == (ref.exists(rel), ref.is_dir(rel)), rel
    assert local.listdir("step-1/manifest.json/x") == [] and not local.exists("step-1/manifest.json/x")
    for rel in ("step-1/manifest.json", "step-1/data/o"):
        assert (local.size(rel), local.read_bytes(rel)) == (ref.size(rel), ref.read_bytes(rel))
        assert local.read_range(rel, 3, 20) == ref.read_range(rel, 3, 20) and local.read_range(rel, 12, 14) == b""
    with pytest.raises(FileNotFoundError):
        local.read_bytes("missing")
    with pytest.raises(ValueError, match="run/step-1: a directory"):
        local.delete("step-1")
    local.delete("step-1", recursive=True)
    local.delete("step-1")  # gone already is fine
    assert local.listdir("") == ["empty"] and not local.is_dir("step-1")


def test_options_reopen_the_same_location_from_json(mem_uri):
    """The daemon reopens storage from ``uri`` + JSON-able options, the retry policy included."""
    s = open_storage(mem_uri, retry=RetryPolicy(max_attempts=3, deadline_s=7.0))
    again = open_storage(s.uri, **json.loads(json.dumps(s.options)))
    assert again.retry == s.retry == RetryPolicy(max_attempts=3, deadline_s=7.0)


@pytest.fixture
def local(tmp_path) -> LocalStorage:
    s = open_storage(str(tmp_path / "loc"))
    assert isinstance(s, LocalStorage)
    return s


def test_local_put_if_absent_creates_once_and_never_replaces(local):
    assert local.put_if_absent("_staging/s/LOCK", b"first") is True
    assert local.put_if_absent("_staging/s/LOCK", b"second") is False
    assert local.read_bytes("_staging/s/LOCK") == b"first"
    assert local.listdir("_staging/s") == ["LOCK"]  # no temp file left beside it


def test_local_put_if_absent_has_one_winner_among_racing_writers(local):
    writers, rounds = 8, 20
    for r in range(rounds):
        rel = f"race/{r}"
        won: list[int] = []
        barrier = threading.Barrier(writers)

        def put(i: int, rel: str = rel, won: list[int] = won, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            if local.put_if_absent(rel, f"writer {i}".encode()):
                won.append(i)

        threads = [threading.Thread(target=put, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, (rel, won)
        assert local.read_bytes(rel) == f"writer {won[0]}".encode()
    assert local.listdir("race") == sorted(str(r) for r in range(rounds))


def test_generic_backend_refuses_put_if_absent_naming_the_object(mem_uri):
    s = open_storage(mem_uri)
    with pytest.raises(ConditionalPutUnsupportedError, match=f"{mem_uri}/LOCK") as e:
        s.put_if_absent("LOCK", b"x")
    assert isinstance(e.value, NotImplementedError)
    assert not s.exists("LOCK")


def test_short_reads_name_the_object_and_range(local, mem_uri):
    local.put_atomic("data/o", b"0123456789")
    with pytest.raises(TruncatedObjectError, match=r"loc/data/o: bytes \[8, 12\) requested, object ends at 10"):
        local.read_into_many("data/o", 8, [memoryview(bytearray(4))])
    with pytest.raises(TruncatedObjectError, match=r"loc/data/o: bytes \[4, 11\)"):
        local.map_range("data/o", 4, 11)
    mem = open_storage(mem_uri)
    mem.put_atomic("data/o", b"0123456789")
    with pytest.raises(TruncatedObjectError, match=rf"{mem_uri}/data/o: bytes \[8, 12\)"):
        mem.read_into_many("data/o", 8, [memoryview(bytearray(4))])


def test_wrappers_implement_the_whole_protocol(local, tmp_path):
    """No abstract method is left to chance: each wrapper is a complete Storage that forwards."""
    tee = TeeStorage(local, str(tmp_path / "tee"))
    ram = RamTierStorage(local, str(tmp_path / "ram"), set())
    for w in (tee, ram):
        assert isinstance(w, Storage) and w.uri == local.uri and w.options == local.options
        assert w.put_if_absent("k", b"v") is (w is tee)  # the first wrapper created it
        assert w.exists("k") and w.size("k") == 1 and w.listdir("") == ["k"] and w.read_range("k", 0, 1) == b"v"
        assert w.local_path("k") == local.local_path("k") and not w.is_remote and w.uri_of("k") == local.uri_of("k")
    assert tee.supports_mapping and bytes(tee.map_range("k", 0, 1)) == b"v"
    ram.delete("k")
    assert not local.exists("k")


def test_ram_tier_routes_its_objects_to_the_copy(local, tmp_path):
    local.put_atomic("data/a", b"storage-a")
    local.put_atomic("data/b", b"storage-b")
    copy = tmp_path / "ram"
    (copy / "data").mkdir(parents=True)
    (copy / "data" / "a").write_bytes(b"ramcopy-a")
    ram = RamTierStorage(local, str(copy), {"data/a"})
    assert not ram.supports_mapping and ram.map_range("data/a", 0, 1) is None  # every read passes the router
    got = {rel: bytearray(9) for rel in ("data/a", "data/b")}
    for rel, buf in got.items():
        ram.read_into_many(rel, 0, [memoryview(buf)])
    assert got == {"data/a": bytearray(b"ramcopy-a"), "data/b": bytearray(b"storage-b")}
    assert ram.bytes_from_ram == 9


def test_tee_copies_data_objects_only(local, tmp_path):
    tee = TeeStorage(local, str(tmp_path / "tee"))
    with tee.open_write("data/x") as f:
        f.write(b"payload")
    with tee.open_write("_staging/s/rank-00000.json") as f:
        f.write(b"{}")
    assert local.read_bytes("data/x") == b"payload" and tee.written == {"data/x": 7}
    assert (tmp_path / "tee" / "data" / "x").read_bytes() == b"payload"
    assert not (tmp_path / "tee" / "_staging").exists()
    tee.discard()
    assert not os.path.exists(tmp_path / "tee" / "data" / "x") and local.exists("data/x")
