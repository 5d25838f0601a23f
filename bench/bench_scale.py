"""bench_scale: what planning, commit and load planning cost one rank at W = 8 .. 16384 ranks, beside DCP.

A simulation that runs the project's REAL planning (``plan.rank_descriptor`` / ``make_save_plan``),
commit (``commit.commit``) and load planning (``load.read_manifest``, ``TensorRecord.chunks_in``,
``readplan``) code on synthetic descriptors of a 33.8B-element llama-like state (37 layers,
hidden 5120, FFN 12416, vocab 32000: 336 parameters x (weight, exp_avg, exp_avg_sq) = 1008 fp32
tensors), laid out as FSDP (``Shard(0)`` over W) or TP=8 x FSDP (a (W/8, 8) mesh, FSDP2-over-TP
placements). Each figure is measured on sample ranks (rank 0 and rank W/2); what a rank receives
from the others is built as the collectives would deliver it (``all_gather_object`` pads every
rank's payload to the largest, so a rank receives W x the largest).

The object store is simulated in memory (``SimStore``, a ``Storage`` subclass): every request
sleeps ``--latency`` seconds (default 20 ms, S3-like) and is logged with its time and key prefix
(the key up to its last ``/``), so request counts and per-prefix request rates per second are
counted, not estimated. Waiting ranks run the real ``commit.write_rank_index`` and ``commit.wait_committed``
one after the other on a simulated clock (W-1 threads would measure the machine, not the protocol).

DCP: its planner (``create_default_global_save_plan``, rank 0's job) runs on synthetic
``SavePlan`` s with one ``WriteItem`` per tensor shard for W up to ``--dcp-max-world``; the
figures above it are extrapolated linearly in W x T (marked ``~``). Its ``.metadata`` is pickled
and unpickled for real (every loading rank reads all of it).

    .venv/bin/python bench/bench_scale.py                      # W = 8 .. 16384, ~15 min on 2 cores
    .venv/bin/python bench/bench_scale.py --worlds 8,256 --layouts fsdp   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pickle
import random
import sys
import threading
import time
import tracemalloc
from collections import Counter, defaultdict
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.distributed.tensor import Replicate, Shard  # noqa: E402
from torch.distributed.tensor.placement_types import _StridedShard  # noqa: E402

from ckpt import commit as commit_mod  # noqa: E402
from ckpt.describe import TensorEntry, dtensor_pieces, placement_json  # noqa: E402
from ckpt.format import MANIFEST, Chunk, index_name, object_name, object_pattern  # noqa: E402
from ckpt.indexes import digest, encode_index  # noqa: E402
from ckpt.liveness import REMOTE_INTERVAL_S, heartbeat_name  # noqa: E402
from ckpt.locate import read_manifest  # noqa: E402
from ckpt.plan import fingerprint, make_save_plan, rank_descriptor  # noqa: E402
from ckpt.readplan import ReadSettings, intersect_chunks, plan_reads  # noqa: E402
from ckpt.rules import Mesh, _holders, grid, rule_chunks  # noqa: E402
from ckpt.save import _head  # noqa: E402
from ckpt.storage.base import Storage  # noqa: E402

LAYERS, HIDDEN, FFN, VOCAB = 37, 5120, 12416, 32000
CHUNK_BYTES, BLOCK_BYTES = 64 << 20, 4 << 20
S3_READS, S3_WRITES = 5500, 3500  # per second per partitioned prefix; targets are half of these


def model() -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, kind) of the 1008 tensors; kind picks the TP placement."""
    params = [("tok_embeddings.weight", (VOCAB, HIDDEN), "col")]
    for i in range(LAYERS):
        p = f"layers.{i}."
        params += [(p + f"attention.{w}.weight", (HIDDEN, HIDDEN), "col") for w in ("wq", "wk", "wv")]
        params += [(p + "attention.wo.weight", (HIDDEN, HIDDEN), "row")]
        params += [(p + f"feed_forward.{w}.weight", (FFN, HIDDEN), "col") for w in ("w1", "w3")]
        params += [(p + "feed_forward.w2.weight", (HIDDEN, FFN), "row")]
        params += [(p + "attention_norm.weight", (HIDDEN,), "norm"), (p + "ffn_norm.weight", (HIDDEN,), "norm")]
    params += [("norm.weight", (HIDDEN,), "norm"), ("output.weight", (VOCAB, HIDDEN), "col")]
    out = []
    for prefix in ("model.", "optim.exp_avg.", "optim.exp_avg_sq."):
        out += [(prefix + k, s, kind) for k, s, kind in params]
    return out


def layout(name: str, world: int, kind: str) -> tuple[tuple[int, ...], tuple]:
    """(mesh shape, placements) of a tensor of ``kind`` under layout ``name``."""
    if name == "fsdp":
        return (world,), (Shard(0),)
    dp = world // 8
    return (dp, 8), {
        "col": (_StridedShard(0, split_factor=8), Shard(0)),
        "row": (Shard(0), Shard(1)),
        "norm": (Shard(0), Replicate()),
    }[kind]


class State:
    """Synthetic TensorEntries of any rank (what ``describe.flatten`` gives for real DTensors)."""

    def __init__(self, name: str, world: int) -> None:
        self.name, self.world, self.tensors = name, world, model()
        self.ranks = tuple(range(world))
        self._meshes: dict[tuple, tuple] = {}

    def entries(self, rank: int) -> dict[str, TensorEntry]:
        out = {}
        cache: dict[tuple, tuple] = {}
        for key, shape, kind in self.tensors:
            mesh_shape, placements = layout(self.name, self.world, kind)
            found = cache.get((shape, kind))
            if found is None:
                coord = _coord(rank, mesh_shape)
                local, pieces = dtensor_pieces(key, shape, mesh_shape, coord, placements)
                mesh = self._meshes.setdefault(mesh_shape, (mesh_shape, self.ranks))
                found = cache[(shape, kind)] = (local, pieces, mesh, tuple(placement_json(p) for p in placements))
            local, pieces, mesh, names = found
            t = torch.empty(local, dtype=torch.float32, device="meta")
            out[key] = TensorEntry(key, t, shape, pieces, f"DTensor{names}", mesh, names)
        return out


def _coord(rank: int, mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    coord = []
    for n in reversed(mesh_shape):
        coord.append(rank % n)
        rank //= n
    return tuple(reversed(coord))


class SimExchange:
    """The collectives as rank ``rank`` sees them when every rank is in one class (identical
    descriptors, as under FSDP and TP x FSDP). Counts the bytes this rank receives."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.received = rank, world, 0

    def all_gather(self, obj: Any) -> list[Any]:
        self.received += self.world * len(pickle.dumps(obj))  # torch pads every payload to the largest
        return [obj] * self.world

    def broadcast(self, obj: Any, src: int) -> Any:
        if self.rank != src:
            obj = self.desc  # the leader's descriptor: the same as this rank's, in one class
            self.received += len(pickle.dumps(obj))
        return obj


class SimStore(Storage):
    """An in-memory object store with per-request latency and a request log."""

    def __init__(self, latency: float, uri: str = "sim://bucket/ckpt") -> None:
        self.uri, self.options, self.latency = uri, {}, latency
        self.objects: dict[str, bytes] = {}
        self._children: dict[str, set[str]] = defaultdict(set)
        self.log: list[tuple[float, str, str]] = []  # (seconds since t0, "r" or "w", prefix)
        self.t0 = time.monotonic()
        self.bytes_read = 0
        self._lock = threading.Lock()

    @property
    def is_remote(self) -> bool:
        return True

    def _req(self, kind: str, rel: str) -> None:
        time.sleep(self.latency)
        with self._lock:
            self.log.append((time.monotonic() - self.t0, kind, rel.rsplit("/", 1)[0] if "/" in rel else ""))

    def open_write(self, rel):  # pragma: no cover - the simulated save writes through put_atomic
        raise NotImplementedError

    def put_atomic(self, rel: str, data: bytes) -> None:
        self._req("w", rel)
        with self._lock:
            self.objects[rel] = bytes(data)
            parts = rel.split("/")
            for i in range(len(parts)):
                self._children["/".join(parts[:i])].add(parts[i])

    @property
    def supports_put_if_absent(self) -> bool:
        return True

    def put_if_absent(self, rel: str, data: bytes) -> bool:
        """S3's If-None-Match: one PUT, refused if the key exists (the manifest's exclusive create)."""
        if rel in self.objects:
            self._req("w", rel)
            return False
        self.put_atomic(rel, data)
        return True

    def remove_empty_dir(self, rel: str) -> None:
        self._req("w", rel)  # one DeleteObject of "rel/", as on S3

    def read_bytes(self, rel: str) -> bytes:
        self._req("r", rel)
        if rel not in self.objects:
            raise FileNotFoundError(self.uri_of(rel))
        self.bytes_read += len(self.objects[rel])
        return self.objects[rel]

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        return self.read_bytes(rel)[start:stop]

    def read_into_many(self, rel, start, bufs) -> None:  # pragma: no cover - no data is read here
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        self._req("r", rel)
        return rel in self.objects or bool(self._children.get(rel.rstrip("/")))

    def size(self, rel: str) -> int:
        self._req("r", rel)
        return len(self.objects[rel])

    def listdir(self, rel: str) -> list[str]:
        names = sorted(self._children.get(rel.rstrip("/"), ()))
        for _ in range(max(1, math.ceil(len(names) / 1000))):  # LIST returns 1000 keys a page
            self._req("r", rel + "/x")
        return names

    def delete(self, rel: str, recursive: bool = False) -> None:
        with self._lock:
            if not recursive:
                gone = [rel] if rel in self.objects else []
            else:
                gone = [k for k in self.objects if k == rel or k.startswith(rel.rstrip("/") + "/")]
        for _ in range(max(1, math.ceil(len(gone) / 1000))):  # DeleteObjects takes 1000 keys a request
            self._req("w", rel)
        with self._lock:
            for k in gone:
                self.objects.pop(k, None)
            if not recursive:  # one file out of the listings, without a rebuild (the committer deletes W of them)
                key = rel if gone else ""
                while key:  # an object store has no empty directories
                    parent, _, name = key.rpartition("/")
                    self._children[parent].discard(name)
                    key = parent if not self._children[parent] else ""
                return
            self._children = defaultdict(set)
            for k in self.objects:
                parts = k.split("/")
                for i in range(len(parts)):
                    self._children["/".join(parts[:i])].add(parts[i])


@contextmanager
def measured(out: dict, prefix: str, memory: bool):
    """CPU seconds and wall seconds, or (with ``memory``) the traced peak in MB."""
    gc.collect()
    grid.cache_clear()  # a rank builds its grids once; measure that too
    _holders.cache_clear()
    if memory:
        tracemalloc.start()
    c0, w0 = time.process_time(), time.perf_counter()
    yield
    if memory:
        out[prefix + "_mb"] = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    else:
        out[prefix + "_cpu_s"] = time.process_time() - c0
        out[prefix + "_wall_s"] = time.perf_counter() - w0


def plan_rank(state: State, rank: int, memory: bool) -> tuple[dict, Any]:
    """A first save's planning on ``rank``: describe, fingerprint, exchange, plan."""
    entries = state.entries(rank)
    ex = SimExchange(rank, state.world)
    out: dict[str, float] = {}
    with measured(out, "plan", memory):
        desc, own = rank_descriptor(entries)
        ex.desc = desc
        fingerprint(desc, own, state.world, CHUNK_BYTES)
        plan = make_save_plan(desc, own, None, entries, ex, CHUNK_BYTES, "bench000")
    out["recv_mb"] = ex.received / 1e6
    return out, plan


def rank_records(state: State, rank: int, save_id: str) -> tuple[dict[str, list[dict]], int]:
    """The chunk records ``rank`` writes (offsets as its data object would have them, synthetic checksums)."""
    _, plan = plan_rank(state, rank, memory=False)
    obj = object_name(save_id, rank, state.world)
    at, recs = 4096, {}
    for item in plan.items:
        n = item.chunk.numel * 4
        sums = tuple(f"{(rank * 7919 + at + b) & (2**64 - 1):016x}" for b in range(max(1, -(-n // BLOCK_BYTES))))
        recs.setdefault(item.key, []).append(Chunk(item.chunk, obj, at, n, sums).to_json())
        at += n
    return recs, at


def staged_save(state: State, store: SimStore, save_id: str, readers: set[int]) -> dict:
    """Put every rank's staging index (and the object indexes ``readers`` will read) into ``store``
    without latency, as a finished save leaves them; returns sizes for the report."""
    world = state.world
    _, plan0 = plan_rank(state, 0, memory=False)
    head = _head(plan0, {}, 1000, {"loss": 1.5}, {}, _Opts(), world)
    head["rank_objects"] = object_pattern(save_id, world)
    keys = [k for k, _, _ in state.tensors]
    head["structure"] = {"dict": [[k, None] for k in keys]}
    template_recs, template_size = rank_records(state, 0, save_id)
    template_index = encode_index(save_id, object_name(save_id, 0, world), template_recs)
    latency, store.latency = store.latency, 0.0
    for r in range(world):
        obj = object_name(save_id, r, world)
        if r in readers or r == 0:
            recs, size = rank_records(state, r, save_id) if r else (template_recs, template_size)
            raw = encode_index(save_id, obj, recs)
            store.objects[index_name(obj)] = raw
            ix = {"index": index_name(obj), "digest": digest(raw)}
        else:
            raw, size = template_index, template_size
            ix = {"index": index_name(obj), "digest": f"{r:016x}"}  # never read
        idx = {"rank": r, "objects": {obj: size, index_name(obj): len(raw)}, "chunks": {}, "bytes": size - 4096}
        idx["indexes"] = {obj: ix}
        if r == 0:
            idx.update(head)
        store.put_atomic(commit_mod.rank_index_name(save_id, r, world), json.dumps(idx).encode())
    store.latency = latency
    store.log.clear()
    return {"index_kb": len(template_index) / 1e3}


class _Opts:
    block_bytes = BLOCK_BYTES
    overwrite = False


def load_targets(state: State, rank: int) -> dict[str, TensorEntry]:
    return state.entries(rank)


def load_plan(store: SimStore, targets: dict[str, TensorEntry], memory: bool) -> dict:
    """A rank's load planning: read and validate the manifest, read the object indexes its targets
    need, intersect, plan the reads (everything ``load.read_tensors`` does before fetching bytes)."""
    out: dict[str, float] = {}
    before = store.bytes_read
    with measured(out, "load", memory):
        manifest = read_manifest(store)
        needs = []
        for key, e in targets.items():
            rec = manifest.tensors[key]
            for i, piece in enumerate(e.pieces):
                got, covered = intersect_chunks(key, i, piece.box, rec.chunks_in(piece.box), 4, 1 << 20)
                assert covered == piece.box.numel, (key, piece.box, covered)
                needs.extend(got)
        reads = plan_reads(needs, ReadSettings(manifest.block_bytes), lambda n: True)
    out["load_read_mb"] = (store.bytes_read - before) / 1e6
    out["reads"] = len(reads)
    return out


def rates(log: list[tuple[float, str, str]]) -> dict[str, float]:
    """Most requests on one prefix in one second, reads and writes."""
    per: Counter = Counter()
    for t, kind, prefix in log:
        per[(kind, prefix, int(t))] += 1
    reads = max((n for (k, _, _), n in per.items() if k == "r"), default=0)
    writes = max((n for (k, _, _), n in per.items() if k == "w"), default=0)
    return {"max_reads_per_s": reads, "max_writes_per_s": writes, "requests": len(log)}


class _Clock:
    """Simulated time for ``commit``'s ``time.monotonic`` / ``time.sleep``."""

    def __init__(self, t: float) -> None:
        self.t = t

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class _PollStore:
    """What a waiting rank sees: its index present until the commit, no ABORT, then a manifest
    naming its save (read as its first bytes); requests logged at simulated times."""

    is_remote = True
    uri = "sim://bucket/ckpt"

    def __init__(self, clock: _Clock, log: list, commit_end: float, save_id: str) -> None:
        self.clock, self.log, self.commit_end, self.save_id = clock, log, commit_end, save_id

    def _req(self, kind: str, rel: str) -> None:
        self.log.append((self.clock.t, kind, rel.rsplit("/", 1)[0]))

    def put_atomic(self, rel: str, data: bytes) -> None:
        self._req("w", rel)

    def exists(self, rel: str) -> bool:
        self._req("r", rel)
        return self.clock.t < self.commit_end

    def read_bytes(self, rel: str) -> bytes:
        self._req("r", rel)
        raise FileNotFoundError(rel)

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        self._req("r", rel)
        return json.dumps({"format": "ckpt", "version": 2, "save_id": self.save_id}).encode()[start:stop]

    def invalidate(self) -> None:
        pass


def waiting_ranks(world: int, save_id: str, commit_end: float, window: float, seed: int = 0) -> list:
    """The waiting ranks' requests: the REAL ``write_rank_index`` and ``wait_committed`` of each
    rank, run on a simulated clock, the rank's index written at a random time in [0, window)."""
    rng = random.Random(seed)
    log: list = []
    real_time = commit_mod.time
    try:
        for r in range(1, world):
            clock = _Clock(rng.uniform(0, window))
            commit_mod.time = clock  # type: ignore[assignment]
            store = _PollStore(clock, log, commit_end, save_id)
            commit_mod.write_rank_index(store, save_id, r, {}, world)  # type: ignore[arg-type]
            commit_mod.wait_committed(store, save_id, r, 600, world)  # type: ignore[arg-type]
    finally:
        commit_mod.time = real_time
    return log


def heartbeats(world: int, save_id: str, upload_s: float, commit_end: float, window: float, seed: int = 0) -> list:
    """Every rank's heartbeat PUTs (``ckpt.liveness``: one per ``REMOTE_INTERVAL_S`` on an object
    store, from the plan until the rank's index is written, the committer's until the commit),
    at their real keys; the plan at ``-upload_s`` (the ranks upload their data that long), the
    indexes at the same random times as ``waiting_ranks``'."""
    rng = random.Random(seed)
    ends = [commit_end] + [rng.uniform(0, window) for _ in range(1, world)]
    log = []
    for rank, end in enumerate(ends):
        prefix = heartbeat_name(save_id, rank, world).rsplit("/", 1)[0]
        t = -upload_s
        while t < end:
            log.append((t, "w", prefix))
            t += REMOTE_INTERVAL_S
    return log


def bench_world(name: str, world: int, latency: float, window: float, upload_s: float) -> dict:
    state = State(name, world)
    samples = sorted({0, world // 2})
    row: dict[str, Any] = {"layout": name, "world": world}
    for r in samples:
        t, _ = plan_rank(state, r, memory=False)
        m, plan = plan_rank(state, r, memory=True)
        row[f"plan_r{r}"] = {**t, **m, "items": len(plan.items)}
    # Commit: real commit() on the simulated store; waiting ranks simulated on the same timeline.
    save_id = "bench000-000000"
    store = SimStore(latency)
    half = State(name, max(8, world // 2))
    readers = _writers_for(state, samples) | _writers_for(state, [0, half.world // 2], half)
    sizes = staged_save(state, store, save_id, readers)
    store.t0 = time.monotonic() - window  # the committer starts once the last index is written
    out: dict[str, float] = {}
    with measured(out, "commit", False):
        commit_mod.commit(store, save_id, world, 600)
    committer_log = list(store.log)
    manifest_bytes = len(store.objects[MANIFEST])
    staged_again = SimStore(latency)
    staged_save(state, staged_again, save_id, set())
    with measured(out, "commit", True):
        commit_mod.commit(staged_again, save_id, world, 600)
    del staged_again
    commit_end = window + out["commit_wall_s"]
    log = committer_log + waiting_ranks(world, save_id, commit_end, window)
    beats = heartbeats(world, save_id, upload_s, commit_end, window)
    beat_rates = rates(beats)
    row["commit"] = {
        **out, **rates(log + beats), "manifest_mb": manifest_bytes / 1e6, **sizes,
        "heartbeat_puts": len(beats), "heartbeat_max_writes_per_prefix_s": beat_rates["max_writes_per_s"],
    }
    # Load planning on sample ranks, at the same world size and resharded to half of it.
    for label, st in (("same", state), ("half", half)):
        for r in sorted({0, st.world // 2}):
            targets = load_targets(st, r)
            t = load_plan(store, targets, memory=False)
            m = load_plan(store, targets, memory=True)
            row[f"load_{label}_r{r}"] = {**t, "load_mb": m["load_mb"]}
    return row


def _writers_for(state: State, ranks: list[int], target: State | None = None) -> set[int]:
    """Writer ranks whose objects the loads of ``ranks`` (in ``target``'s layout) will read."""
    target = target or state
    mesh_cache: dict[tuple, Mesh] = {}
    found = set()
    for r in ranks:
        for key, e in target.entries(r).items():
            shape = e.global_shape
            kind = next(k for kk, s, k in state.tensors if kk == key)
            mesh_shape, placements = layout(state.name, state.world, kind)
            names = tuple(placement_json(p) for p in placements)
            mesh = mesh_cache.setdefault(mesh_shape, Mesh(mesh_shape, state.ranks))
            g = grid(shape, mesh_shape, names)
            for piece in e.pieces:
                found |= {w for _, _, w in rule_chunks(key, g, [mesh], 4, CHUNK_BYTES, piece.box)}
    return found


# -- DCP ---------------------------------------------------------------------------------------


def dcp_world(name: str, world: int) -> dict:
    """DCP's rank-0 global planning and its metadata on the same shapes (every rank's SavePlan
    built synthetically: one WriteItem per local shard box)."""
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    state = State(name, world)
    props = TensorProperties(dtype=torch.float32)
    plans = []
    for r in range(world):
        items = []
        for key, e in state.entries(r).items():
            for p in e.pieces:
                chunk = ChunkStorageMetadata(torch.Size(p.box.offsets), torch.Size(p.box.sizes))
                data = TensorWriteData(chunk, props, torch.Size(e.global_shape))
                items.append(WriteItem(MetadataIndex(key, p.box.offsets), WriteItemType.SHARD, tensor_data=data))
        plans.append(SavePlan(items))
    recv = sum(len(pickle.dumps(p)) for p in plans)  # rank 0's gather_object
    out: dict[str, float] = {"recv_mb": recv / 1e6}
    gc.collect()
    c0 = time.process_time()
    _, metadata = create_default_global_save_plan(plans)
    out["plan_cpu_s"] = time.process_time() - c0
    raw = pickle.dumps(metadata)
    out["metadata_mb"] = len(raw) / 1e6
    c0 = time.process_time()
    pickle.loads(raw)
    out["load_parse_cpu_s"] = time.process_time() - c0
    return out


def fmt(x: float, unit: str = "") -> str:
    if x >= 100:
        return f"{x:.0f}{unit}"
    return f"{x:.3g}{unit}"


def table(rows: list[dict], dcp: dict[tuple[str, int], dict]) -> str:
    lines = []
    for row in rows:
        w, name = row["world"], row["layout"]
        d = dcp.get((name, w))
        tag = "" if d is None or not d.get("extrapolated") else "~"
        p = [row[k] for k in row if k.startswith("plan_r")]
        ls = [row[k] for k in row if k.startswith("load_same")]
        lh = [row[k] for k in row if k.startswith("load_half")]
        c = row["commit"]
        lines.append(
            f"{name:5} W={w:<6}"
            f" plan cpu {fmt(max(x['plan_cpu_s'] for x in p))}s/{fmt(max(x['plan_mb'] for x in p))}MB"
            f" recv {fmt(max(x['recv_mb'] for x in p))}MB"
            + (f" [DCP rank0 plan {tag}{fmt(d['plan_cpu_s'])}s recv {tag}{fmt(d['recv_mb'])}MB]" if d else "")
            + f" | manifest {fmt(c['manifest_mb'])}MB"
            + (f" [DCP .metadata {tag}{fmt(d['metadata_mb'])}MB]" if d else "")
            + f" | commit {fmt(c['commit_wall_s'])}s wall {fmt(c['commit_cpu_s'])}s cpu {fmt(c['commit_mb'])}MB"
            f" max/prefix/s r{c['max_reads_per_s']} w{c['max_writes_per_s']}"
            f" (heartbeats: {c['heartbeat_puts']} PUTs, w{c['heartbeat_max_writes_per_prefix_s']})"
            f" | load read {fmt(max(x['load_read_mb'] for x in ls + lh))}MB"
            f" cpu {fmt(max(x['load_cpu_s'] for x in ls))}s (W/2: {fmt(max(x['load_cpu_s'] for x in lh))}s)"
            f" wall {fmt(max(x['load_wall_s'] for x in ls + lh))}s {fmt(max(x['load_mb'] for x in ls + lh))}MB"
            + (f" [DCP unpickle .metadata {tag}{fmt(d['load_parse_cpu_s'])}s]" if d else "")
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="8,64,256,1024,4096,16384")
    ap.add_argument("--layouts", default="fsdp,tp8")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds per simulated storage request")
    ap.add_argument("--window", type=float, default=1.0, help="ranks write their staging indexes within this many s")
    ap.add_argument("--upload-s", type=float, default=30.0, help="ranks upload their data this long (heartbeats)")
    ap.add_argument("--dcp-max-world", type=int, default=256, help="measure DCP up to this W, extrapolate above")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, dcp = [], {}
    for name in args.layouts.split(","):
        measured_dcp: dict[int, dict] = {}
        for w in map(int, args.worlds.split(",")):
            if name == "tp8" and w < 16:
                continue
            rows.append(bench_world(name, w, args.latency, args.window, args.upload_s))
            if w <= args.dcp_max_world:
                measured_dcp[w] = dcp[(name, w)] = dcp_world(name, w)
            elif measured_dcp:
                base_w = max(measured_dcp)
                scale = w / base_w
                dcp[(name, w)] = {k: v * scale for k, v in measured_dcp[base_w].items()} | {"extrapolated": True}
            print(table(rows[-1:], dcp), flush=True)
    print("\n" + table(rows, dcp))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "dcp": {f"{k[0]}-{k[1]}": v for k, v in dcp.items()}}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
