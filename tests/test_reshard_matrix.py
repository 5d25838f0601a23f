"""The resharding matrix: save under every layout at world sizes 1, 2 and 4, load
under every other layout at world sizes 1, 2, 3 and 4, bitwise.

Layouts: a replicated plain tensor, DTensor Shard(0) / Shard(1) on a 1-D mesh,
(Shard(0), Shard(1)) and (Replicate(), Shard(0)) on a (2, 2) mesh (world 4),
``Sharded.flat`` (ZeRO: a contiguous range of the flattening, cut at arbitrary
uneven points), ``Sharded.box`` (Megatron TP: a grid of boxes) and
``Sharded.pieces`` (fused QKV under TP: each rank holds [q_r; k_r; v_r] rows of
uneven q/k/v blocks, as with grouped-query attention). Shapes are uneven so that
DTensor ranks get short and empty shards; dtypes are fp32, bf16 and int64.

Every expected local tensor is cut from a reference full tensor made from a fixed
seed by torch's own DTensor sharding or by this file's layout code, never by
ckpt. All saves run in one job per save world size and all loads (every
checkpoint under every target layout) in one job per load world size; ranks are
forked from a preloaded fork server, so a job costs about a second, not the
~3 s per rank of importing torch in a spawned interpreter.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from helpers import same_bits
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import ckpt
from ckpt.reader import CheckpointReader

pytestmark = pytest.mark.dist

SAVE_WORLDS = (1, 2, 4)
LOAD_WORLDS = (1, 2, 3, 4)
# (shape, dtype) of the tensors saved under each layout: uneven, so that e.g. 5 rows
# over 4 ranks give DTensor shards of 2, 2, 1, 0 rows and 9 columns give 3, 3, 3, 0.
SPECS = (((13, 7), torch.float32), ((5, 11), torch.bfloat16), ((6, 9), torch.int64))
LAYOUTS_1D = ("rep", "s0", "s1", "flat", "box", "qkv")
LAYOUTS_2D = ("m2_ss", "m2_rs")
ALL_LAYOUTS = LAYOUTS_1D + LAYOUTS_2D
# Small chunks and blocks: tensors are cut into several chunks, so loads cross chunk
# and checksum-block boundaries inside rows.
OPTIONS = dict(chunk_bytes=96, block_bytes=64)
BAL_TENSORS, BAL_SHAPE, BAL_CHUNK = 8, (8, 8), 64  # 8 replicated fp32 tensors of 4 chunks each

COLLECTIVES = (
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
    "all_gather",
    "all_gather_into_tensor",
    "all_reduce",
    "broadcast",
    "barrier",
    "reduce_scatter_tensor",
)


def layouts(world: int) -> tuple[str, ...]:
    return ALL_LAYOUTS if world == 4 else LAYOUTS_1D


def reference(ckpt_name: str, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The full tensor saved as ``key`` in checkpoint ``ckpt_name`` (differs per checkpoint)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{ckpt_name}/{key}".encode()))
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=g, dtype=torch.int64)
    return torch.randn(shape, generator=g).to(dtype)


def sentinel(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, -77, dtype=dtype)


def balanced(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) of each part, the first ``n % parts`` one longer."""
    out, lo = [], 0
    for i in range(parts):
        size = n // parts + (i < n % parts)
        out.append((lo, lo + size))
        lo += size
    return out


def box_grid(world: int) -> tuple[int, int]:
    """Rows x columns of the TP box grid: columns (1 x 2), rows (3 x 1), both (2 x 2)."""
    return {1: (1, 1), 2: (1, 2), 3: (3, 1), 4: (2, 2)}[world]


def make(layout: str, full: torch.Tensor, rank: int, world: int, meshes: dict) -> object:
    """The state-dict value this rank holds of ``full`` under ``layout`` (its own memory)."""
    shape = tuple(full.shape)
    if layout == "rep":
        return full.clone()
    if layout in ("s0", "s1", "m2_ss", "m2_rs"):
        mesh = meshes["2d"] if layout.startswith("m2") else meshes["1d"]
        placements = {
            "s0": [Shard(0)],
            "s1": [Shard(1)],
            "m2_ss": [Shard(0), Shard(1)],
            "m2_rs": [Replicate(), Shard(0)],
        }[layout]
        return distribute_tensor(full.clone(), mesh, placements, src_data_rank=None)
    if layout == "flat":
        n = full.numel()
        lo, hi = n * rank * rank // (world * world), n * (rank + 1) ** 2 // (world * world)
        return ckpt.Sharded.flat(full.reshape(-1)[lo:hi].clone(), shape, lo)
    if layout == "box":
        gr, gc = box_grid(world)
        (r0, r1), (c0, c1) = balanced(shape[0], gr)[rank // gc], balanced(shape[1], gc)[rank % gc]
        return ckpt.Sharded.box(full[r0:r1, c0:c1].clone(), shape, (r0, c0))
    if layout == "qkv":
        parts, pieces, at = [], [], 0
        for b0, b1 in balanced(shape[0], 3):  # q, k, v blocks (uneven when rows % 3 != 0)
            lo, hi = balanced(b1 - b0, world)[rank]
            parts.append(full[b0 + lo : b0 + hi])
            pieces.append(((b0 + lo, 0), (at, 0), (hi - lo, shape[1])))
            at += hi - lo
        return ckpt.Sharded.pieces(torch.cat(parts).clone(), shape, pieces)
    raise ValueError(layout)


def local_of(value: object) -> torch.Tensor:
    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, ckpt.Sharded):
        return value.tensor
    assert isinstance(value, torch.Tensor)
    return value


def build(
    ckpt_name: str,
    keys: dict[str, str],
    rank: int,
    world: int,
    meshes: dict,
    fill: Callable[[str, tuple, torch.dtype], torch.Tensor],
) -> dict:
    """A state dict holding, for each key, its tensor under the layout ``keys[key]``."""
    sd: dict = {}
    for key, layout in keys.items():
        shape, dtype = SPECS[int(key.rsplit(".", 1)[1])]
        sd[key] = make(layout, fill(key, shape, dtype), rank, world, meshes)
    sd["rep_scalar"] = fill("rep_scalar", (), torch.float32).clone()
    sd["rep_vec"] = fill("rep_vec", (10,), torch.int64).clone()
    return sd


def saved_keys(world: int) -> dict[str, str]:
    """Key -> layout of the tensors a save at ``world`` holds (named after the layout)."""
    return {f"{layout}.{i}": layout for layout in layouts(world) for i in range(len(SPECS))}


def _meshes(world: int) -> dict:
    meshes = {"1d": init_device_mesh("cpu", (world,))}
    if world == 4:
        meshes["2d"] = init_device_mesh("cpu", (2, 2))
    return meshes


class _CollectiveCounter:
    """Counts calls of torch.distributed collectives (patched in this process only);
    a collective that another one runs inside (all_gather_object -> all_gather) is not
    counted again."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._saved: list[tuple[object, str, object]] = []
        self._depth = 0

    def __enter__(self) -> _CollectiveCounter:
        from torch.distributed import distributed_c10d

        for name in COLLECTIVES:
            original = getattr(distributed_c10d, name)

            def counted(*a, _name=name, _original=original, **kw):
                if self._depth == 0:
                    self.counts[_name] = self.counts.get(_name, 0) + 1
                self._depth += 1
                try:
                    return _original(*a, **kw)
                finally:
                    self._depth -= 1

            for module in (dist, distributed_c10d):
                self._saved.append((module, name, getattr(module, name)))
                setattr(module, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)


def save_job(rank: int, world: int, root: str) -> dict:
    """Save checkpoint ``w{world}`` (every layout), ``w{world}-again`` (same structure,
    must reuse the plan) and ``w{world}-bal`` (replicated only), counting collectives."""
    meshes = _meshes(world)
    name = f"w{world}"
    keys = saved_keys(world)
    sd = build(name, keys, rank, world, meshes, lambda k, s, d, n=name: reference(n, k, s, d))
    sd["world"] = world
    opts = ckpt.SaveOptions(**OPTIONS)
    counts = {}
    with _CollectiveCounter() as c:
        ckpt.save(sd, f"{root}/{name}", step=world, options=opts)
    counts["first"] = dict(c.counts)
    with _CollectiveCounter() as c:
        ckpt.save(sd, f"{root}/{name}-again", step=world, options=opts)
    counts["again"] = dict(c.counts)

    # The reused plan must still write every byte: load it back in this layout.
    back = build(name, keys, rank, world, meshes, lambda k, s, d: sentinel(s, d))
    back["world"] = -1
    ckpt.load(back, f"{root}/{name}-again")
    bad = [k for k in keys if not same_bits(local_of(back[k]), local_of(sd[k]))]
    bad += [k for k in ("rep_scalar", "rep_vec") if not same_bits(back[k], sd[k])]
    if back["world"] != world:
        bad.append("world")

    bal = {f"bal.{i}": reference(f"{name}-bal", f"bal.{i}", BAL_SHAPE, torch.float32) for i in range(BAL_TENSORS)}
    with _CollectiveCounter() as c:
        ckpt.save(bal, f"{root}/{name}-bal", options=ckpt.SaveOptions(chunk_bytes=BAL_CHUNK, block_bytes=64))
    counts["bal"] = dict(c.counts)
    return {"counts": counts, "reload_mismatches": bad}


def load_job(rank: int, world: int, root: str) -> dict:
    """Load every saved checkpoint under every target layout of this world size.

    Pass j gives key (layout L, spec i) the target layout ``targets[(index(L) + j) % n]``,
    so over the passes each stored tensor is loaded into every layout this world has.
    Returns the mismatches, each naming checkpoint, key, source and target layout.
    """
    meshes = _meshes(world)
    targets = layouts(world)
    failures: list[str] = []
    checked = 0
    for save_world in SAVE_WORLDS:
        name = f"w{save_world}"
        stored = saved_keys(save_world)
        for j in range(len(targets)):
            plan = {k: targets[(ALL_LAYOUTS.index(L) + j) % len(targets)] for k, L in stored.items()}
            sd = build(name, plan, rank, world, meshes, lambda k, s, d: sentinel(s, d))
            sd["world"] = -1
            # Odd passes read without coalescing gaps: many small spans instead of few large ones.
            options = ckpt.LoadOptions(max_gap_bytes=0) if j % 2 else None
            manifest = ckpt.load(sd, f"{root}/{name}", options=options)
            expect = build(name, plan, rank, world, meshes, lambda k, s, d, n=name: reference(n, k, s, d))
            for key in sd:
                if key == "world":
                    ok = sd[key] == save_world and manifest.step == save_world
                else:
                    ok = same_bits(local_of(sd[key]), local_of(expect[key]))
                    checked += 1
                if not ok:
                    where = f"{stored.get(key, 'rep')}@{save_world} -> {plan.get(key, 'rep')}@{world}"
                    failures.append(f"rank {rank}: {name} {key} ({where}) differs after load")
    return {"failures": failures, "checked": checked}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, dict[int, list[dict]]]:
    root = str(tmp_path_factory.mktemp("matrix"))
    results = {w: run_ranks(save_job, w, root, start_method="forkserver", timeout=240) for w in SAVE_WORLDS}
    return root, results


@pytest.mark.parametrize("world", LOAD_WORLDS)
def test_load_every_checkpoint_under_every_layout(saved, world: int) -> None:
    root, _ = saved
    results = run_ranks(load_job, world, root, start_method="forkserver", timeout=240)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    per_ckpt = sum(len(saved_keys(w)) + 2 for w in SAVE_WORLDS)
    assert [r["checked"] for r in results] == [per_ckpt * len(layouts(world))] * world


def test_reused_plan_needs_no_collective_and_writes_everything(saved) -> None:
    _, results = saved
    for world, ranks in results.items():
        for rank, r in enumerate(ranks):
            assert not r["reload_mismatches"], f"world {world} rank {rank}: {r['reload_mismatches']}"
            # A new structure: one small all-gather, then one broadcast per class of ranks (here every
            # rank holds the same keys: one class). A reused one: nothing.
            first = {"all_gather_object": 1, "broadcast_object_list": 1} if world > 1 else {}
            assert r["counts"]["first"] == first, (world, rank)
            assert r["counts"]["again"] == {}, f"world {world} rank {rank}: second save ran {r['counts']['again']}"
            assert r["counts"]["bal"] == first, (world, rank)


def _assert_each_element_stored_once(manifest: ckpt.Manifest, where: str) -> None:
    for key, rec in manifest.tensors.items():
        boxes = [c.box for c in rec.chunks]
        assert sum(b.numel for b in boxes) == math.prod(rec.shape), f"{where} {key}: {boxes}"
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a.intersect(b) is None, f"{where} {key}: chunks {a} and {b} overlap"


def test_every_tensor_written_once(saved) -> None:
    """Replicated tensors and replicated mesh dimensions are stored as one chunk set,
    and the ranks together wrote exactly the checkpoint's bytes (no duplicates)."""
    root, _ = saved
    for world in SAVE_WORLDS:
        manifest = CheckpointReader(f"{root}/w{world}").manifest
        _assert_each_element_stored_once(manifest, f"w{world}")
        assert "rep.0" in manifest.tensors and (world < 4 or "m2_rs.0" in manifest.tensors)
        total = sum(rec.nbytes for rec in manifest.tensors.values())
        assert sum(manifest.topology["bytes_written_per_rank"]) == total
        assert sum(c.length for rec in manifest.tensors.values() for c in rec.chunks) == total


def test_replicated_writes_balanced_across_ranks(saved) -> None:
    """8 replicated tensors of 4 equal chunks: every rank writes exactly 32 / world of them."""
    root, _ = saved
    chunk_count = BAL_TENSORS * math.prod(BAL_SHAPE) * 4 // BAL_CHUNK
    for world in SAVE_WORLDS:
        manifest = CheckpointReader(f"{root}/w{world}-bal").manifest
        _assert_each_element_stored_once(manifest, f"w{world}-bal")
        share = chunk_count * BAL_CHUNK // world
        assert manifest.topology["bytes_written_per_rank"] == [share] * world
        per_object: dict[str, int] = {}
        for rec in manifest.tensors.values():
            for c in rec.chunks:
                per_object[c.object] = per_object.get(c.object, 0) + c.length
        ranks = sorted(int(obj.rsplit("-r", 1)[1].split(".")[0]) for obj in per_object)
        assert ranks == list(range(world)) and set(per_object.values()) == {share}, per_object
        for i in range(BAL_TENSORS):
            got = CheckpointReader(f"{root}/w{world}-bal").read(f"bal.{i}")
            assert same_bits(got, reference(f"w{world}-bal", f"bal.{i}", BAL_SHAPE, torch.float32))
