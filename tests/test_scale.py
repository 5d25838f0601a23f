"""Planning and manifests at any world size: rules, local planning, object indexes, exact coverage.

The pure tests run every rank's planner in this process over a simulated exchange (as
bench/bench_scale.py does); the dist test saves DTensors on 4 real ranks and loads them back,
counting the object indexes a rank reads.
"""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
from dist import run_ranks
from helpers import assert_bitwise, manifest_of, random_tensor
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

import ckpt
from ckpt.describe import Piece, TensorEntry, dtensor_pieces, flatten, placement_json
from ckpt.errors import CheckpointFormatError, UnsupportedValueError
from ckpt.load import LoadOptions, open_checkpoint, read_tensors
from ckpt.plan import coverage_problem, make_save_plan, rank_descriptor
from ckpt.regions import Box
from ckpt.rules import grid

LAYOUTS = [
    ((7, 5), (4,), (Shard(0),)),
    ((9, 6), (2, 3), (Replicate(), Shard(1))),
    ((16, 4), (2, 2), (_StridedShard(0, split_factor=2), Shard(0))),
    ((10, 6), (3, 2), (Shard(0), Shard(1))),
    ((12, 3), (2, 3), (Shard(0), Shard(0))),
    ((5, 4), (8,), (Shard(0),)),  # more parts than rows: empty shards
]


def _entry(key, shape, mesh_shape, placements, rank, dtype=torch.float32) -> TensorEntry:
    coord, flat = [], rank
    for n in reversed(mesh_shape):
        coord.append(flat % n)
        flat //= n
    local, pieces = dtensor_pieces(key, shape, mesh_shape, tuple(reversed(coord)), placements)
    ranks = tuple(range(len(list(itertools.product(*map(range, mesh_shape))))))
    return TensorEntry(
        key, torch.empty(local, dtype=dtype, device="meta"), shape, pieces, "DTensor",
        (mesh_shape, ranks), tuple(placement_json(p) for p in placements),
    )


@pytest.mark.parametrize("shape,mesh_shape,placements", LAYOUTS)
def test_grid_cells_are_the_shards_dtensor_lays_out(shape, mesh_shape, placements) -> None:
    """Every shard's pieces are cells of the rule's grid at that shard's coordinate, and the
    cells tile the tensor: a reader's grid is the writer's layout."""
    g = grid(shape, mesh_shape, tuple(placement_json(p) for p in placements))
    cells = list(g.cells_in(Box.full(shape)))
    assert sum(c.numel for c, _ in cells) == torch.Size(shape).numel()
    assert coverage_problem("t", shape, [c for c, _ in cells]) is None
    by_box = dict(cells)
    for coord in itertools.product(*map(range, mesh_shape)):
        _, pieces = dtensor_pieces("t", shape, mesh_shape, coord, placements)
        for p in pieces:
            if p.box.numel:
                assert by_box[p.box] == tuple(coord[m] for m in g.shard_dims), (coord, p.box)


class _Sim:
    """Every rank's round-one payload and class descriptors, served to one rank's planner."""

    def __init__(self, payloads, descs, rank):
        self.payloads, self.descs, self.rank, self.world = payloads, descs, rank, len(payloads)

    def all_gather(self, obj):
        return self.payloads

    def broadcast(self, obj, src):
        return self.descs[src]


def _plan_all(states, chunk_bytes):
    """Plan every rank's share of ``states`` (rank -> {key: TensorEntry})."""
    world = len(states)
    descs = [rank_descriptor(s) for s in states]
    from ckpt.plan import _digest

    payloads = [{"class": _digest(d), "own": o or None, "error": None, "token": "t"} for d, o in descs]
    return [
        make_save_plan(*descs[r], None, states[r], _Sim(payloads, [d for d, _ in descs], r), chunk_bytes, "t")
        for r in range(world)
    ]


def test_local_plans_write_every_element_once_and_balance_replicas() -> None:
    """Twelve ranks, each planning alone: DTensors on a 2-d mesh with replicas, plain tensors,
    Sharded boxes replicated over pairs of ranks. Every element is written exactly once."""
    world, mesh_shape = 12, (3, 4)
    layouts = {
        "hsdp": ((40, 8), (Replicate(), Shard(0))),
        "tp_fsdp": ((48, 6), (_StridedShard(0, split_factor=4), Shard(0))),
        "grid": ((9, 10), (Shard(0), Shard(1))),
    }
    states = []
    for r in range(world):
        s = {k: _entry(k, shape, mesh_shape, pl, r) for k, (shape, pl) in layouts.items()}
        for i in range(5):
            whole = (Piece(Box((0,), (64,)), (0,)),)
            s[f"plain{i}"] = TensorEntry(f"plain{i}", torch.empty(64, device="meta"), (64,), whole, "replicated")
        rows = (Piece(Box((2 * (r // 2), 0), (2, 4)), (0, 0)),)  # pairs of ranks hold the same rows
        s["meg"] = TensorEntry("meg", torch.empty(2, 4, device="meta"), (12, 4), rows, "sharded")
        states.append(s)
    plans = _plan_all(states, chunk_bytes=64)
    written = {}
    for r, plan in enumerate(plans):
        for item in plan.items:
            written.setdefault(item.key, []).append(item.chunk)
            assert states[r][item.key].pieces[item.piece].box.contains(item.chunk), (r, item)
    for key, boxes in written.items():
        shape = states[0][key].global_shape
        assert coverage_problem(key, shape, boxes) is None, key
    assert {k for k, m in plans[0].tensors.items() if m.rule} == set(layouts)
    per_rank = [sum(i.chunk.numel for i in p.items if i.key.startswith("plain")) for p in plans]
    assert max(per_rank) - min(per_rank) <= 64, per_rank  # 5 x 64 elements over 12 ranks, largest first
    hsdp = [sum(i.chunk.numel for i in p.items if i.key == "hsdp") for p in plans]
    assert min(hsdp) > 0, hsdp  # replicas share the writing


def test_ranks_disagreeing_on_a_dtensor_spec_are_refused() -> None:
    states = [{"w": _entry("w", (8, 4), (2,), (Shard(0),), r)} for r in range(2)]
    states[1]["w"] = _entry("w", (8, 4), (2,), (Shard(1),), 1)
    with pytest.raises(UnsupportedValueError, match="w: ranks disagree"):
        _plan_all(states, 1 << 20)


def test_overlap_found_at_any_box_count() -> None:
    """The pairwise check stopped at 64 boxes; now an overlap or a gap among thousands is found."""
    boxes = [Box((i, 0), (1, 4)) for i in range(5000)]
    assert coverage_problem("k", (5000, 4), boxes) is None
    bad = boxes[:-1] + [Box((4998, 2), (2, 2))]
    assert "overlap" in coverage_problem("k", (5000, 4), bad)
    columns = [Box((0, j), (3, 1)) for j in range(3000)]
    assert coverage_problem("k", (3, 3000), columns) is None
    assert "cover" in coverage_problem("k", (3, 3001), columns)


def _save_dtensors(rank: int, world: int, root: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2))
    full = {k: random_tensor(shape, torch.float32, seed=i) for i, (k, shape) in enumerate(SHAPES.items())}
    sd = {
        "fsdp": distribute_tensor(full["fsdp"], mesh, (Shard(0), Shard(0))),
        "hsdp": distribute_tensor(full["hsdp"], mesh, (Replicate(), Shard(0))),
        "tp": distribute_tensor(full["tp"], mesh, (_StridedShard(0, split_factor=2), Shard(0))),
        "plain": full["plain"],
    }
    opts = ckpt.SaveOptions(chunk_bytes=256, block_bytes=64)
    ckpt.save(sd, f"{root}/ckpt", options=opts)
    # Load into a 4-way row split of each tensor through Sharded: rank r needs rows of 2 of the 4 objects.
    target, counted = {}, {}
    for k, t in full.items():
        rows = t.shape[0] // world
        target[k] = ckpt.Sharded.box(torch.zeros(rows, *t.shape[1:]), tuple(t.shape), (rank * rows, 0))
    storage, manifest = open_checkpoint(f"{root}/ckpt")

    read_tensors(storage, manifest, flatten(target).tensors, LoadOptions())
    source = next(r.chunks.source for r in manifest.tensors.values() if r.rule)
    counted["indexes_read"] = source.fetched
    for k, t in full.items():
        rows = t.shape[0] // world
        assert_bitwise(target[k].tensor, t[rank * rows : (rank + 1) * rows])
    return counted


SHAPES = {"fsdp": (16, 8), "hsdp": (8, 8), "tp": (16, 4), "plain": (8, 3)}


@pytest.mark.dist
def test_dtensors_are_stored_as_rules_and_a_rank_reads_only_the_indexes_it_needs(tmp_path) -> None:
    results = run_ranks(_save_dtensors, 4, str(tmp_path), start_method="forkserver")
    assert all(0 < r["indexes_read"] < 4 for r in results), results
    doc = json.loads((tmp_path / "ckpt" / "manifest.json").read_bytes())
    assert {k for k, t in doc["tensors"].items() if "rule" in t} == {"fsdp", "hsdp", "tp"}
    assert "chunks" in doc["tensors"]["plain"] and doc["meshes"] == [{"shape": [2, 2], "ranks": [0, 1, 2, 3]}]
    # Whole tensors read back through every index; a damaged index is named.
    manifest = manifest_of(str(tmp_path / "ckpt"))
    assert sum(c.box.numel for c in manifest.tensors["tp"].chunks) == 64
    victim = sorted(doc["indexes"].values(), key=lambda e: e["index"])[0]["index"]
    path = tmp_path / "ckpt" / victim
    raw = bytearray(path.read_bytes())
    raw[raw.index(b'"offset":') + 9] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointFormatError, match=os.path.basename(victim)):
        for rec in manifest_of(str(tmp_path / "ckpt")).tensors.values():
            list(rec.chunks)


def test_a_dtensor_held_on_one_mesh_per_replica_group_is_written_once() -> None:
    """Expert weights on a sub-mesh per data-parallel group: two meshes of one shape hold copies;
    the rule lists both, and each cell is written by one rank of either copy."""
    states = []
    for r in range(4):
        entry = _entry("experts", (6, 2), (2,), (Shard(0),), r % 2)
        ranks = (0, 1) if r < 2 else (2, 3)
        states.append({"experts": TensorEntry(entry.key, entry.local, entry.global_shape, entry.pieces, entry.layout,
                                              ((2,), ranks), entry.placements)})
    plans = _plan_all(states, chunk_bytes=8)
    assert plans[0].tensors["experts"].rule.meshes == (0, 1)
    written = [i.chunk for p in plans for i in p.items]
    assert coverage_problem("experts", (6, 2), written) is None
    assert len({r for r, p in enumerate(plans) if p.items}) > 2  # both copies share the writing


def test_waiting_ranks_stay_under_half_of_s3s_read_limit_in_every_second() -> None:
    """4096 ranks that finish within one second, polling on commit.poll_delays for 30 s: no
    second sees more than 2,750 requests (half of S3's 5,500 reads per second per prefix)."""
    import random

    from ckpt.commit import poll_delays

    remote = type("Remote", (), {"is_remote": True})()
    rng = random.Random(0)
    per_second = [0] * 40
    for _ in range(4096):
        t = rng.random()
        for delay in poll_delays(remote, 4096, rng):
            t += delay
            if t >= 30:
                break
            per_second[int(t)] += 1
    assert max(per_second) <= 2750, per_second
    assert sum(per_second) > 4096 * 5  # and they do keep polling (about every 4 s each)
    local = type("Local", (), {"is_remote": False})()
    assert next(poll_delays(local, 4096)) <= 0.001  # a local disk is polled at once


def test_object_names_spread_over_prefixes_past_64_ranks() -> None:
    from ckpt.format import object_name, object_pattern, rank_object

    assert object_name("s", 3, 8) == "data/s-r00003.safetensors"
    assert object_name("s", 130, 256) == "data/02/s-r00130.safetensors"
    for world in (8, 256):
        assert all(rank_object(object_pattern("s", world), r) == object_name("s", r, world) for r in range(world))


def test_a_waiting_rank_of_a_large_job_waits_for_its_spread_index(tmp_path) -> None:
    """Past 64 ranks the staging indexes sit under spread prefixes; a waiting rank must poll its
    own there (not return at once), and learn of an abort once the committer deletes it."""
    from ckpt.commit import _abort, rank_index_name, wait_committed, write_rank_index
    from ckpt.errors import SaveAbortedError
    from ckpt.storage import open_storage

    storage = open_storage(str(tmp_path))
    for r in (0, 70):
        write_rank_index(storage, "s-0", r, {"rank": r}, world=100)
    assert storage.exists("_staging/s-0/06/rank-00070.json")
    with pytest.raises(SaveAbortedError, match="no commit within"):
        wait_committed(storage, "s-0", 70, 0.3, world_size=100)
    with pytest.raises(SaveAbortedError, match="rank failure: rank 3 died"):
        _abort(storage, "s-0", {"rank": None, "error": "SaveAbortedError", "message": "rank failure: rank 3 died"})
    assert not storage.exists(rank_index_name("s-0", 70, 100))
    with pytest.raises(SaveAbortedError, match="rank 3 died"):
        wait_committed(storage, "s-0", 70, 5, world_size=100)


def test_an_index_checks_the_records_a_load_uses_and_only_those() -> None:
    """A rank reads an index holding every tensor its writer saved but uses a few records: the lines
    of those keys are parsed and their records checked against the manifest (a bad one names the
    index, key and chunk); the other lines are never parsed, so they cost nothing."""
    from ckpt.format import Chunk, LazyChunks, Manifest, Mesh, Rule, TensorRecord
    from ckpt.indexes import ObjectIndex, encode_index

    obj = "data/s-r00000.safetensors"
    rule = Rule((0,), ("S0",), 1 << 20)
    tensors = {k: TensorRecord((4, 2), "float32", LazyChunks(k), "DTensor", rule) for k in "abcd"}
    manifest = Manifest(
        save_id="s", tensors=tensors, values={}, objects={obj: 4096}, block_bytes=64,
        meshes=[Mesh((1,), (0,))], rank_objects="data/s-r{rank}.safetensors",
    )
    box = Box((0, 0), (4, 2))
    good = Chunk(box, obj, 64, 32, ("0" * 16,)).to_json()
    records = {
        "a": [good],
        "b": [{**good, "offset": 4090}],  # past the end of the object
        "c": [{**good, "checksums": "not a list"}],
        "d": [good],
    }
    line_of_a = json.dumps([good], separators=(",", ":")).encode()  # a's line comes first, d's last
    raw = encode_index("s", obj, records).replace(line_of_a, b"[{not json", 1)
    index = ObjectIndex.from_bytes(raw, "idx.json", obj, manifest)
    assert index.find("d", box) == Chunk.from_json(good)
    with pytest.raises(CheckpointFormatError, match=r"idx\.json.*b chunk .*outside object"):
        index.find("b", box)
    with pytest.raises(CheckpointFormatError, match=r"idx\.json.*c: checksums must be a JSON list"):
        index.find("c", box)
    with pytest.raises(CheckpointFormatError, match=r"idx\.json: no record of d chunk"):
        index.find("d", Box((0, 0), (2, 2)))
    with pytest.raises(CheckpointFormatError, match=r"idx\.json: malformed index"):
        index.find("a", box)  # its line was damaged; finding d did not parse it
    for bad in (raw.replace(b'"keys":["a"', b'"keys":["x"'), raw.rsplit(b"\n", 1)[0]):
        with pytest.raises(CheckpointFormatError, match=r"idx\.json: malformed index"):
            ObjectIndex.from_bytes(bad, "idx.json", obj, manifest)
