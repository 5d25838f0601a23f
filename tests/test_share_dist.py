"""Read once, share across replicas, on 4 gloo ranks: plain replicated state and a 2x2 HSDP-style DTensor
state load bitwise with sharing on and off, while the bytes read from storage (counted by the slowfs
filesystem, which ckpt sees as a remote store) fall from one copy per replica to one copy in all; a
corrupt chunk and a mismatch on one rank make every rank raise instead of hanging a broadcast."""

from __future__ import annotations

import dataclasses

import pytest
import slowfs
import torch
import torch.distributed as dist
from dist import run_ranks, run_ranks_outcomes
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import ckpt
from ckpt.format import Manifest
from ckpt.locate import open_checkpoint
from ckpt.options import Compression

pytestmark = pytest.mark.dist

WORLD = 4
# Small chunks, blocks and rounds, so that a few KiB of state takes the paths a large one takes:
# tensors of several chunks, chunks cut into slabs on block edges, several rounds per group.
SAVE = ckpt.SaveOptions(chunk_bytes=32 << 10, block_bytes=4 << 10)


def _plain(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(300, 70, generator=g),  # 82 KiB: 3 chunks
        "wt": torch.randn(90, 40, generator=g).t(),  # a non-contiguous target: packed, not broadcast in place
        "ids": torch.randint(0, 1 << 40, (1000,), generator=g),
        "bf": torch.randn(40, 33, generator=g).to(torch.bfloat16),
        "flags": torch.rand(17, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "step": 7,
    }


def _hsdp(seed: int, rank: int) -> dict:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "shard"))
    g = torch.Generator().manual_seed(seed)
    full = {
        "w": torch.randn(130, 64, generator=g),
        "odd": torch.randn(5, 3, generator=g),  # uneven Shard(0): 3 rows and 2 rows
        "norm": torch.randn(64, generator=g),
    }
    out: dict = {
        "w": distribute_tensor(full["w"], mesh, [Replicate(), Shard(0)]),
        "odd": distribute_tensor(full["odd"], mesh, [Replicate(), Shard(0)]),
        "norm": distribute_tensor(full["norm"], mesh, [Replicate(), Replicate()]),
        "head": torch.randn(33, 20, generator=g),  # plain: every rank holds it
    }
    # a per-rank Megatron-style shard: read directly, beside the shared ones
    out["tp"] = ckpt.Sharded.box(torch.full((2, 8), float(seed + rank)), (2 * WORLD, 8), (2 * rank, 0))
    return out


def _state(kind: str, seed: int, rank: int) -> dict:
    return _plain(seed) if kind == "plain" else _hsdp(seed, rank)


def _locals(state: dict) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if isinstance(v, DTensor):
            out[k] = v.to_local()
        elif isinstance(v, ckpt.Sharded):
            out[k] = v.tensor
        elif isinstance(v, torch.Tensor):
            out[k] = v
    return out


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    raw = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(*raw)


def _data_bytes() -> int:
    return sum(n for path, n in slowfs.COUNTS.items() if path.endswith(".safetensors"))


def _load_twice(rank: int, world: int, path: str, kind: str, counter: str) -> dict:
    saved = _state(kind, 0, rank)
    ckpt.save(saved, path, options=SAVE)
    want = _locals(saved)
    results: dict = {}
    opts = {"storage_options": {"state": counter}, "share_bucket_bytes": 24 << 10, "share_min_bytes": 1 << 10}
    for mode in (True, False, "auto"):
        target = _state(kind, 1, rank)
        slowfs.COUNTS.clear()
        dist.barrier()
        ckpt.load(target, f"slowfs://{path}", options=ckpt.LoadOptions(share_replicas=mode, **opts))
        got = _locals(target)
        results[mode] = {
            "bytes": _data_bytes(),
            "bitwise": sorted(k for k in want if _bitwise(got[k], want[k])),
            "step": target.get("step"),
        }
    # local files take the other read paths (direct preadv, page-cache mappings of partial chunks),
    # and compressed chunks are read by frames (the checksum blocks parts are cut on)
    zipped = dataclasses.replace(SAVE, compression=Compression())
    ckpt.save(_state(kind, 0, rank), f"{path}-z", options=zipped)
    for where in (path, f"{path}-z"):
        target = _state(kind, 2, rank)
        ckpt.load(target, where, options=ckpt.LoadOptions(share_replicas=True, share_bucket_bytes=24 << 10))
        got = _locals(target)
        results[where] = sorted(k for k in want if _bitwise(got[k], want[k]))
    return results


def _manifest(path: str) -> Manifest:
    return open_checkpoint(path)[1]  # bound to its storage: DTensors' chunks are in object indexes


def _state_bytes(path: str) -> dict[str, int]:
    return {k: t.dtype.itemsize * int(torch.Size(t.shape).numel()) for k, t in _manifest(path).tensors.items()}


@pytest.mark.parametrize("kind", ["plain", "hsdp"])
def test_replicas_read_once_and_load_bitwise(tmp_path, kind):
    path = str(tmp_path / "c")
    results = run_ranks(
        _load_twice, WORLD, path, kind, str(tmp_path / "counter"), start_method="forkserver", timeout=400
    )
    sizes = _state_bytes(path)
    assert any(c.codec is not None for t in _manifest(f"{path}-z").tensors.values() for c in t.chunks)
    total = sum(sizes.values())
    tensors = sorted(sizes)
    for r in results:
        for mode in (True, False, "auto"):
            assert r[mode]["bitwise"] == tensors, (mode, r[mode])
        assert r[path] == r[f"{path}-z"] == tensors
    if kind == "plain":
        assert [r[True]["step"] for r in results] == [7] * WORLD
        shared, direct = total, WORLD * total
    else:
        # each rank's own "tp" rows are read by that rank alone; everything else once per job when shared,
        # while without sharing each rank reads its half of "w"/"odd" and all of "norm"/"head" (at least:
        # a direct read may read through small gaps between the chunks it needs)
        tp = sizes["tp"]
        shared = total
        direct = 2 * (sizes["w"] + sizes["odd"]) + WORLD * (sizes["norm"] + sizes["head"]) + tp
    assert sum(r[True]["bytes"] for r in results) == shared
    assert sum(r["auto"]["bytes"] for r in results) == shared  # slowfs is remote: auto shares
    read_directly = sum(r[False]["bytes"] for r in results)
    assert read_directly == direct if kind == "plain" else direct <= read_directly < direct + 1024
    assert all(r[True]["bytes"] > 0 for r in results)  # every member read its share


def _corrupt_or_mismatch(rank: int, world: int, path: str, what: str) -> None:
    target = _plain(1)
    if what == "mismatch" and rank == 2:
        target["w"] = torch.zeros(301, 70)
    ckpt.load(target, f"slowfs://{path}", options=ckpt.LoadOptions(share_replicas=True, share_bucket_bytes=24 << 10))


def _save_plain(rank: int, world: int, path: str) -> None:
    ckpt.save(_plain(0), path, options=SAVE)


@pytest.mark.parametrize("what", ["corrupt", "mismatch"])
def test_every_rank_raises_when_one_fails(tmp_path, what):
    from damage import flip_bits

    path = str(tmp_path / "c")
    run_ranks(_save_plain, 1, path, start_method="forkserver")
    if what == "corrupt":
        chunk = _manifest(path).tensors["w"].chunks[1]
        flip_bits(f"{path}/{chunk.object}", chunk.offset + 100, 0x10)
    outcomes = run_ranks_outcomes(_corrupt_or_mismatch, WORLD, path, what, start_method="forkserver", timeout=300)
    assert [o.status for o in outcomes] == ["error"] * WORLD, [o.status for o in outcomes]
    kind = "CorruptChunkError" if what == "corrupt" else "StateDictMismatchError"
    for o in outcomes:
        assert kind in o.value, o.value
