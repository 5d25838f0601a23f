"""Mutated manifests over real data objects: every tool fails typed, or yields exactly the saved data.

Hypothesis mutates one to three places of a real checkpoint's manifest (numbers by +-1 and by an
item size, to zero, negative, huge, to other JSON types; strings to paths outside the checkpoint,
to planted symlinks, FIFOs and directories; lists and dicts by dropping, duplicating, renaming),
usually sealing the digest again as a writer that wrote those contents would (else the digest
check is all that is exercised). Then load, verify, ``ckpt.read``, ``ckpt info`` / ``verify`` /
``ls`` and gc planning run on it, and each must either raise a ``CheckpointError`` subclass or
give back bitwise the saved tensors, within a watchdog (no hang), without allocating more than the
objects hold, and without a successful read through a planted link. The fast test runs a
few dozen manifests (a few seconds); the ``slow`` one 10,000.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager

import helpers
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.catalog import plan_gc, scan
from ckpt.cli import main as cli_main
from ckpt.format import MANIFEST, seal
from ckpt.options import RetentionPolicy
from ckpt.reader import CheckpointReader

PLANTED = {  # names inside the checkpoint that are not regular files, and what each is
    "data/link.safetensors": "symlink",
    "data/fifo.safetensors": "fifo",
    "data/dir.safetensors": "directory",
}
OUTSIDE_NAMES = ["../outside.safetensors", "/etc/passwd", "data/../../outside.safetensors", "s3://x/y", ""]
WATCHDOG_S = 30


def _state() -> dict:
    return {
        "a": helpers.random_tensor((12, 5), torch.float32, 1),
        "b": helpers.random_tensor((7,), torch.int64, 2),
        "c": helpers.random_tensor((3, 4, 2), torch.bfloat16, 3),
        "s": helpers.random_tensor((), torch.float64, 4),
        "e": torch.empty(0, 3),
        "lr": [0.1, 0.2],
    }


class Base:
    """One real checkpoint (several chunks and checksum blocks per tensor), its planted neighbours,
    and the pristine manifest; built once per process."""

    _made: Base | None = None

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ckpt-fuzz-")
        self.root = os.path.join(self.dir, "run")
        self.uri = os.path.join(self.root, "step-00000001")
        self.want = _state()
        ckpt.save(self.want, self.uri, step=1, options=ckpt.SaveOptions(chunk_bytes=64, block_bytes=64))
        with open(os.path.join(self.uri, MANIFEST), "rb") as f:
            self.raw = f.read()
        self.doc = json.loads(self.raw)
        (self.object,) = self.doc["objects"]
        real = os.path.join(self.uri, self.object)
        self.object_bytes = os.path.getsize(real)
        shutil.copy(real, os.path.join(self.root, "outside.safetensors"))  # a read of it would pass checksums
        shutil.copy(real, os.path.join(self.uri, "data", "copy.safetensors"))  # a legitimate second name
        os.symlink(os.path.join(self.root, "outside.safetensors"), os.path.join(self.uri, "data", "link.safetensors"))
        os.mkfifo(os.path.join(self.uri, "data", "fifo.safetensors"))
        os.mkdir(os.path.join(self.uri, "data", "dir.safetensors"))

    @classmethod
    def get(cls) -> Base:
        if cls._made is None:
            cls._made = Base()
        return cls._made


def _places(node, path=()):
    """Every (path, value) of the document, containers included."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _places(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _places(v, (*path, i))


def _set(doc, path, value):
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _delete(doc, path):
    node = doc
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]


@st.composite
def _new_value(draw, old):
    """A replacement for ``old``: a near miss of the same type, or another type altogether."""
    others = [None, True, 0, -1, 1.5, "x", [], {}, 2**63, -(2**63), 10**30, "NaN"]
    if type(old) is int:
        near = [old + 1, old - 1, old + 4, old - 4, old + 8, 0, -old, old * 2, old // 2, 2**62, 2**64, float(old)]
        near.append(draw(st.integers(-(2**70), 2**70)))
        return draw(st.sampled_from(near + others))
    if type(old) is str:
        near = [old + "x", old[:-1], old.upper(), *PLANTED, *OUTSIDE_NAMES, "data/copy.safetensors", "data/gone"]
        near.append(draw(st.text(max_size=12)))
        return draw(st.sampled_from(near + others))
    if type(old) is list:
        variants = [old[:-1], old + old[-1:], old[::-1], [*old, 0], [*old, "x"], old[1:] + old[:1]]
        return draw(st.sampled_from(variants + others))
    if type(old) is dict:
        keys = list(old)
        variants = [{}, {**old, "zz": 1}, [old]]
        if keys:
            k = draw(st.sampled_from(keys))
            renamed = {(k + "x" if kk == k else kk): v for kk, v in old.items()}
            variants += [renamed, {kk: v for kk, v in old.items() if kk != k}]
        return draw(st.sampled_from(variants + others))
    return draw(st.sampled_from(others))


@st.composite
def mutated(draw):
    base = Base.get()
    doc = copy.deepcopy(base.doc)
    doc.pop("digest")
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["replace", "replace", "replace", "delete", "redirect"]))
        if kind == "redirect":  # one name everywhere, so validation passes and the reader meets the file
            name = draw(st.sampled_from([*PLANTED, "data/copy.safetensors", "data/gone.safetensors"]))
            objects, tensors = doc.get("objects"), doc.get("tensors")
            if isinstance(objects, dict) and base.object in objects:
                objects[name] = objects.pop(base.object)
            for rec in tensors.values() if isinstance(tensors, dict) else ():
                chunks = rec.get("chunks") if isinstance(rec, dict) else None
                for c in chunks if isinstance(chunks, list) else ():
                    if isinstance(c, dict) and c.get("object") == base.object:
                        c["object"] = name
            continue
        places = [p for p, _ in _places(doc) if p]
        path = draw(st.sampled_from(places))
        if kind == "delete":
            _delete(doc, path)
        else:
            node = doc
            for p in path:
                node = node[p]
            _set(doc, path, draw(_new_value(node)))
    reseal = draw(st.sampled_from([True, True, True, False]))
    body = json.dumps(doc, separators=(",", ":")).encode()
    if reseal:
        return seal(body)
    return base.raw if body == base.raw else body[:-1] + b',"digest":' + json.dumps(base.doc["digest"]).encode() + b"}"


@contextmanager
def watchdog(seconds: int):
    def hang(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def bounded_allocations(limit_bytes: int):
    """torch.empty that refuses to allocate more than ``limit_bytes`` at once (an absurd allocation)."""
    real = torch.empty

    def empty(*size, **kw):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        dtype = kw.get("dtype") or torch.get_default_dtype()
        n = math.prod(int(s) for s in shape) * (torch.tensor([], dtype=dtype).element_size() if dtype else 4)
        assert n <= limit_bytes, f"asked for {n} bytes for a checkpoint whose object holds {limit_bytes // 64}"
        return real(*size, **kw)

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def _planted_in(raw: bytes) -> bool:
    return any(name.encode() in raw for name in PLANTED)


def check(raw: bytes, note=event) -> None:
    """Every tool on the manifest ``raw``: typed failure, or the saved data exactly (``note`` tallies
    load outcomes in hypothesis' statistics)."""
    base = Base.get()
    with open(os.path.join(base.uri, MANIFEST), "wb") as f:
        f.write(raw)
    outcomes = []
    with watchdog(WATCHDOG_S), bounded_allocations(64 * base.object_bytes + (1 << 16)):
        target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in base.want.items()}
        target["lr"] = [0.0, 0.0]
        try:
            ckpt.load(target, base.uri)
            outcomes.append("loaded")
            for k, v in base.want.items():
                if isinstance(v, torch.Tensor):
                    helpers.assert_bitwise(target[k], v, k)
            note("load: bitwise")
        except ckpt.CheckpointError as e:
            note(f"load: {type(e).__name__}")
        try:
            got = ckpt.read(base.uri)
            outcomes.append("read")
            for k, v in base.want.items():
                if isinstance(v, torch.Tensor) and v.numel():
                    helpers.assert_bitwise(got[k], v, k)
                elif isinstance(v, torch.Tensor):  # no element to get wrong: a sealed edit may reshape it
                    assert got[k].numel() == 0, (k, got[k].shape)
        except (ckpt.CheckpointError, KeyError):  # KeyError: ckpt.read of keys the structure lacks
            pass
        try:
            failures = CheckpointReader(base.uri).verify()
            if not failures:
                outcomes.append("verified")
        except ckpt.CheckpointError:
            pass
        entries = scan(base.root)  # never raises for one damaged checkpoint
        assert [e.name for e in entries] == ["step-00000001"]
        plan_gc(entries, RetentionPolicy(keep_last=1))
        for command in ("info", "verify"):
            os.environ["CKPT_DEBUG"] = "1"  # the CLI re-raises instead of printing: check the type
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    cli_main([command, "-q", base.uri])
            except ckpt.CheckpointError:
                pass
            finally:
                del os.environ["CKPT_DEBUG"]
    if outcomes and _planted_in(raw):
        body = json.loads(raw)
        named = {c.get("object") for r in body["tensors"].values() for c in r["chunks"]}
        assert not named & set(PLANTED), f"{outcomes} through a planted object: {named & set(PLANTED)}"


FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)


@settings(max_examples=50, **FUZZ)
@given(mutated())
def test_mutated_manifests_fail_typed_or_give_the_saved_data(raw):
    check(raw)


@pytest.mark.slow
@settings(max_examples=10_000, **FUZZ)
@given(mutated())
def test_ten_thousand_mutated_manifests(raw):
    check(raw)


def test_the_unmutated_manifest_loads_everywhere():
    """The harness itself: the pristine manifest passes every tool (so a typed error above is the mutation's)."""
    base = Base.get()
    start = time.perf_counter()
    check(base.raw, note=lambda _: None)
    target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in base.want.items()}
    target["lr"] = [0.0, 0.0]
    ckpt.load(target, base.uri)
    assert target["lr"] == [0.1, 0.2] and CheckpointReader(base.uri).verify() == []
    assert time.perf_counter() - start < WATCHDOG_S


@pytest.mark.parametrize("moved", ["s", "b"])
def test_a_chunk_moved_onto_another_chunks_offset_is_still_checked(moved):
    """Found by the 10,000-manifest run: a sealed edit gave ``s`` the byte offset of ``a``'s first
    chunk; blocks to verify were keyed by offset, so only ``a``'s checksum was checked and ``s``
    loaded another tensor's bytes without an error."""
    base = Base.get()
    doc = copy.deepcopy(base.doc)
    doc.pop("digest")
    doc["tensors"][moved]["chunks"][0]["offset"] = doc["tensors"]["a"]["chunks"][0]["offset"]
    check(seal(json.dumps(doc, separators=(",", ":")).encode()), note=lambda _: None)
    target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in base.want.items()}
    with pytest.raises(ckpt.CorruptChunkError, match=rf"\b{moved}\b"):
        ckpt.load(target, base.uri)
