"""The `ckpt` command: every subcommand, its exit codes, --json, and bad input.

Commands run in-process through ``ckpt.cli.main`` (fast, and memory:// stays
visible); one test runs the real console entry point in a subprocess.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from importlib.metadata import entry_points

import fsspec
import pytest
import torch
from damage import flip_bits
from helpers import random_tensor, run_cli

import ckpt
from ckpt import SaveOptions
from ckpt.cli import main
from ckpt.format import MANIFEST
from ckpt.options import LoadOptions
from ckpt.reader import CheckpointReader
from ckpt.readplan import ReadSettings, intersect_chunks, plan_reads
from ckpt.reshard import TargetLayout
from ckpt.writer import CheckpointWriter


def state(seed: int = 0) -> dict:
    return {
        "model": {
            "w": torch.randn(40, 24, generator=torch.Generator().manual_seed(seed)),
            "b": torch.arange(24, dtype=torch.float32),
            "h": random_tensor((6, 10), torch.bfloat16, seed + 1),
            "ids": torch.arange(100, dtype=torch.int64),
        },
        "step": 5,
        "config": {"lr": 0.25, "layers": [1, 2]},
    }


SMALL = SaveOptions(chunk_bytes=1024, block_bytes=256)


def save(uri: str, sd: dict | None = None, step: int | None = 5) -> None:
    metrics = {"loss": 1.0 / step} if step else None
    ckpt.save(sd or state(), uri, step=step, metrics=metrics, options=SaveOptions(chunk_bytes=1024, block_bytes=256))


def write_uncommitted(uri: str) -> None:
    """Data objects of a save that never committed (no manifest)."""
    w = CheckpointWriter(uri, SMALL)
    with w.tensor_stream("x", (300,), torch.float32) as s:
        for b in s.boxes:
            s.send(torch.ones(b.sizes))


def snapshot(root: str) -> dict[str, str]:
    """Every file under root with a hash of its bytes: 'nothing modified' is equality."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def one(tmp_path) -> str:
    uri = str(tmp_path / "c")
    save(uri)
    return uri


# --- parser, help, entry point -------------------------------------------------------------------


def test_help_lists_every_command_and_exit_codes():
    with pytest.raises(SystemExit) as e:
        run_cli("--help")
    assert e.value.code == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    text = out.getvalue()
    for name in ("ls", "info", "verify", "diff", "convert", "export", "reshard", "gc", "merge"):
        assert f"    {name}" in text
    assert "exit codes" in text
    for name in ("ls", "info", "verify", "diff", "convert", "export", "reshard", "gc"):
        sub = io.StringIO()
        with contextlib.redirect_stdout(sub), pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0 and "usage: ckpt " + name in sub.getvalue()


def test_usage_errors_exit_2(tmp_path, one):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main(["export", one, str(tmp_path / "x")])  # --to missing
    assert e.value.code == 2 and "--to" in err.getvalue()
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as e:
        main(["gc", str(tmp_path), "--keep-last", "0"])
    assert e.value.code == 2
    code, _, err2 = run_cli("reshard", one, str(tmp_path / "r"), "--layout", "shard1")
    assert code == 2 and "--for-world" in err2 and not (tmp_path / "r").exists()
    code, _, err2 = run_cli("reshard", one, str(tmp_path / "r"), "--for-world", "2", "--layout", "rows")
    assert code == 2 and "shard0" in err2 and not (tmp_path / "r").exists()
    for argv in (
        ("diff", one, str(tmp_path / "gone")),
        ("gc", str(tmp_path / "gone")),
        ("convert", str(tmp_path / "gone"), str(tmp_path / "r")),
    ):
        code, _, err2 = run_cli(*argv)
        assert code == 2 and "gone" in err2 and len(err2.strip().splitlines()) == 1, argv
    assert not (tmp_path / "r").exists()


def test_console_script_is_declared():
    # the script pip generates is `sys.exit(ckpt.cli:main())`; main's exit codes are tested in-process
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("ckpt") == "ckpt.cli:main"


def test_progress_reports_every_byte_and_stays_off_without_a_tty(tmp_path, one):
    from ckpt.diff import diff
    from ckpt.interop import CkptSource, export_safetensors
    from ckpt.interop.convert import convert

    m = CheckpointReader(one).manifest
    total = sum(r.nbytes for r in m.tensors.values())
    ticks: list[int] = []
    assert CheckpointReader(one).verify(progress=ticks.append) == []
    assert sum(ticks) == sum(c.length for r in m.tensors.values() for c in r.chunks) == total
    with CkptSource(one) as src:
        for name, fn in (
            ("convert", lambda p: convert(src, str(tmp_path / "c2"), SMALL, progress=p, pack_bytes=512)),
            ("export", lambda p: export_safetensors(src, str(tmp_path / "hf"), 2048, slab_bytes=256, progress=p)),
            ("diff", lambda p: diff(src, src, slab_bytes=256, progress=p)),
        ):
            ticks = []
            fn(ticks.append)
            assert sum(ticks) == total, name
            assert len(ticks) > len(m.tensors), name  # per chunk/slab, not per tensor
    code, out, err = run_cli("verify", one)  # stderr is not a terminal here: no bar
    assert code == 0 and err == ""


# --- info / verify -------------------------------------------------------------------------------


def test_info_text_json_and_chunks(one):
    code, out, _ = run_cli("info", one)
    assert code == 0
    assert "model.w" in out and "[40, 24]" in out and "float32" in out and "bfloat16" in out
    assert "step        5" in out and "world_size=1" in out
    code, out, _ = run_cli("info", one, "--json")
    doc = json.loads(out)
    assert doc["step"] == 5 and doc["values"] == {"step": 5, "config.lr": 0.25, "config.layers": [1, 2]}
    w = doc["tensors"]["model.w"]
    assert w["shape"] == [40, 24] and w["dtype"] == "float32" and w["nbytes"] == 40 * 24 * 4
    assert w["chunks"] == math.ceil(40 * 24 * 4 / 1024)
    code, out, _ = run_cli("info", one, "--json", "--chunks")
    chunks = json.loads(out)["tensors"]["model.w"]["chunk_list"]
    assert sum(math.prod(c["sizes"]) for c in chunks) == 40 * 24


def test_verify_ok_and_json(one):
    code, out, _ = run_cli("verify", one)
    assert code == 0 and out.startswith("OK:")
    code, out, _ = run_cli("verify", one, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and doc["failures"] == [] and doc["chunks"] > 4


def test_verify_names_each_corrupt_chunk(one):
    m = CheckpointReader(one).manifest
    before = snapshot(one)
    targets = [m.tensors["model.w"].chunks[1], m.tensors["model.ids"].chunks[0]]
    for c in targets:
        flip_bits(os.path.join(one, c.object), c.offset + 3, 0xFF)
    corrupted = snapshot(one)
    assert corrupted != before
    code, out, err = run_cli("verify", one)
    assert code == 1, out + err
    corrupt = [line for line in out.splitlines() if line.startswith("CORRUPT")]
    assert len(corrupt) == 2
    assert any("model.w" in line and str(targets[0].box) in line for line in corrupt)
    assert any("model.ids" in line for line in corrupt)
    assert "FAILED: 2 of" in out
    code, out, _ = run_cli("verify", one, "--json")
    doc = json.loads(out)
    assert code == 1 and not doc["ok"] and len(doc["failures"]) == 2
    assert snapshot(one) == corrupted  # verify modifies nothing


def test_verify_truncated_object_names_chunk(one):
    m = CheckpointReader(one).manifest
    c = m.tensors["model.w"].chunks[-1]
    path = os.path.join(one, c.object)
    with open(path, "r+b") as f:
        f.truncate(c.offset + 10)
    code, out, _ = run_cli("verify", one)
    assert code == 1 and "model.w" in out and "CORRUPT" in out


@pytest.mark.parametrize("command", ["info", "verify", "export"])
def test_not_a_checkpoint_truncated_manifest_unknown_format(tmp_path, one, command):
    extra = ["--to", "torch"] if command == "export" else []
    dst = str(tmp_path / "dst.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    for path, want in ((str(empty), 2), (str(tmp_path / "missing"), 2), (str(junk), 2)):
        code, out, err = run_cli(command, path, *([dst] if command == "export" else []), *extra)
        assert code == want, (path, out, err)
        assert len(err.strip().splitlines()) == 1 and path in err and "Traceback" not in err
    # a truncated manifest: damaged input, exit 1, one line naming the manifest
    raw = open(os.path.join(one, MANIFEST), "rb").read()
    with open(os.path.join(one, MANIFEST), "wb") as f:
        f.write(raw[: len(raw) // 2])
    before = snapshot(str(tmp_path))
    code, out, err = run_cli(command, one, *([dst] if command == "export" else []), *extra)
    assert code == 1, (out, err)
    assert len(err.strip().splitlines()) == 1 and MANIFEST in err
    assert snapshot(str(tmp_path)) == before and not os.path.exists(dst)


def test_uncommitted_checkpoint_is_named(tmp_path):
    uri = str(tmp_path / "half")
    write_uncommitted(uri)
    for command in ("info", "verify"):
        code, _, err = run_cli(command, uri)
        assert code == 2 and "uncommitted" in err and "gc" in err


# --- diff ----------------------------------------------------------------------------------------


def test_diff_identical_and_different(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    save(a)
    save(b)
    code, out, _ = run_cli("diff", a, b)
    assert code == 0 and "no differences" in out
    sd = state()
    sd["model"]["w"][3, 4] += 0.5
    sd["model"]["b"][0] = float("nan")
    del sd["model"]["ids"]
    sd["model"]["extra"] = torch.zeros(2)
    sd["config"]["lr"] = 0.5
    save(c, sd)
    code, out, _ = run_cli("diff", a, c)
    assert code == 1 and "DIFFERENT" in out
    code, out, _ = run_cli("diff", a, c, "--json")
    doc = json.loads(out)
    assert code == 1 and not doc["equal"]
    by = {t["key"]: t for t in doc["tensors"]}
    assert by["model.w"]["status"] == "different" and by["model.w"]["n_diff"] == 1
    assert by["model.w"]["max_abs"] == pytest.approx(0.5, rel=1e-6)
    want_rel = 0.5 / float(state()["model"]["w"].double().norm())
    assert by["model.w"]["rel_l2"] == pytest.approx(want_rel, rel=1e-6)
    assert by["model.b"]["status"] == "different" and by["model.b"]["max_abs"] == "inf"
    assert by["model.ids"]["status"] == "only_a" and by["model.extra"]["status"] == "only_b"
    assert by["model.h"]["status"] == "identical"
    assert {v["key"]: v["status"] for v in doc["values"]} == {"config.lr": "different"}


def test_diff_tolerance_makes_close(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    sd = state()
    save(a, sd)
    sd["model"]["w"] += 1e-4
    save(b, sd)
    assert run_cli("diff", a, b)[0] == 1
    code, out, _ = run_cli("diff", a, b, "--atol", "1e-3", "--json")
    doc = json.loads(out)
    assert code == 0 and {t["key"]: t["status"] for t in doc["tensors"]}["model.w"] == "close"


def test_diff_shape_mismatch(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    save(a, {"x": torch.zeros(4, 3)})
    save(b, {"x": torch.zeros(3, 4)})
    code, out, _ = run_cli("diff", a, b)
    assert code == 1 and "shape" in out and "[4, 3] vs [3, 4]" in out


# --- ls / gc -------------------------------------------------------------------------------------


def _root(tmp_path) -> str:
    root = str(tmp_path / "run")
    for step in (100, 200, 300, 400):
        save(f"{root}/step-{step:06d}", state(step), step=step)
    # an abandoned save (older than the newest complete one) and one in flight (newer)
    for step in (250, 500):
        write_uncommitted(f"{root}/step-{step:06d}")
    # damaged: manifest cut short
    save(f"{root}/step-000150", step=150)
    p = f"{root}/step-000150/{MANIFEST}"
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:40])
    os.makedirs(f"{root}/notes")
    open(f"{root}/notes/readme.txt", "w").write("not a checkpoint")
    return root


def test_ls_table_and_json(tmp_path):
    root = _root(tmp_path)
    code, out, _ = run_cli("ls", root)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["STEP", "STATUS", "SIZE"]
    names = [line.split()[-1] for line in lines[1:8]]
    assert names == [f"step-{s:06d}" for s in (100, 150, 200, 250, 300, 400, 500)]
    assert "notes" not in out
    code, out, _ = run_cli("ls", root, "--json")
    doc = {e["name"]: e for e in json.loads(out)}
    assert set(doc) == {f"step-{s:06d}" for s in (100, 150, 200, 250, 300, 400, 500)}
    assert doc["step-000100"]["status"] == "complete" and doc["step-000100"]["step"] == 100
    assert doc["step-000100"]["metrics"] == {"loss": 0.01}
    assert doc["step-000100"]["size"] > 40 * 24 * 4 and doc["step-000100"]["created"]
    assert doc["step-000250"]["status"] == "incomplete" and doc["step-000250"]["step"] == 250
    assert doc["step-000150"]["status"] == "damaged" and MANIFEST in doc["step-000150"]["error"]
    code, _, err = run_cli("ls", str(tmp_path / "nope"))
    assert code == 2 and "nope" in err


def test_gc_dry_run_then_delete(tmp_path):
    root = _root(tmp_path)
    before = snapshot(root)
    code, out, _ = run_cli("gc", root, "--keep-last", "2")
    assert code == 0 and "dry run" in out
    assert snapshot(root) == before  # nothing deleted without --yes
    would = sorted(line.split()[2] for line in out.splitlines() if line.startswith("would delete  "))
    assert would == ["step-000100", "step-000200", "step-000250"]
    code, out, _ = run_cli("gc", root, "--keep-last", "2", "--yes", "--json")
    doc = json.loads(out)
    assert sorted(e["name"] for e in doc["deleted"]) == would
    left = sorted(os.listdir(root))
    assert left == ["notes", "step-000150", "step-000300", "step-000400", "step-000500"]
    # the newest complete checkpoint survives any rule, and so does the one `latest` names
    with open(os.path.join(root, "latest"), "w") as f:
        json.dump({"name": "step-000300", "step": 300}, f)
    code, out, _ = run_cli("ls", root)
    assert "step-000300  <- latest" in out
    code, out, _ = run_cli("gc", root, "--keep-every", "1000", "--yes")
    assert code == 0 and "deleted 0 checkpoint(s)" in out
    os.unlink(os.path.join(root, "latest"))
    code, out, _ = run_cli("gc", root, "--keep-every", "1000", "--yes")
    assert code == 0 and sorted(os.listdir(root)) == ["notes", "step-000150", "step-000400", "step-000500"]
    m = CheckpointReader(f"{root}/step-000400").manifest
    assert m.step == 400


def test_gc_keep_every_and_best(tmp_path):
    root = str(tmp_path / "run")
    for step in (100, 200, 300, 400, 500):
        ckpt.save(state(step), f"{root}/s{step}", step=step, metrics={"loss": abs(step - 210)})
    code, out, _ = run_cli("gc", root, "--keep-every", "200", "--keep-best", "1", "--metric", "loss", "--yes")
    assert code == 0
    assert sorted(os.listdir(root)) == ["s200", "s400", "s500"]  # every 200, best (200), newest (500)
    code, _, err = run_cli("gc", root, "--keep-best", "1")
    assert code == 2 and "--metric" in err


# --- convert / export / reshard on ckpt and memory:// --------------------------------------------


def test_reshard_rechunk_keeps_everything(tmp_path, one):
    dst = str(tmp_path / "r")
    code, out, err = run_cli("reshard", one, dst, "--chunk-bytes", "128", "--block-bytes", "64")
    assert code == 0, err
    src, new = CheckpointReader(one).manifest, CheckpointReader(dst).manifest
    assert len(new.tensors["model.w"].chunks) == 40 > len(src.tensors["model.w"].chunks)  # one 96-byte row each
    assert new.step == src.step and new.metrics == src.metrics and new.values == src.values
    assert run_cli("diff", one, dst)[0] == 0 and run_cli("verify", dst)[0] == 0
    code, _, err = run_cli("reshard", one, dst)
    assert code == 2 and "--overwrite" in err
    assert run_cli("reshard", one, dst, "--overwrite", "--chunk-bytes", "4KiB")[0] == 0
    assert len(CheckpointReader(dst).manifest.tensors["model.w"].chunks) == 1


@pytest.mark.parametrize("world,dim", [(3, 0), (4, 1)])
def test_reshard_for_world_one_contiguous_object_per_rank(tmp_path, world, dim):
    src = str(tmp_path / "src")
    sd = {
        "w": random_tensor((10, 7), torch.float32, 1),
        "e": random_tensor((5, 9, 2), torch.bfloat16, 2),
        "bias": random_tensor((7,), torch.float32, 3),
        "tiny": random_tensor((2, 2), torch.int64, 4),  # fewer rows than ranks: some ranks get nothing
        "scalar": torch.tensor(3.5),
    }
    ckpt.save(sd, src, step=9, options=SaveOptions(chunk_bytes=64, block_bytes=64))
    dst = str(tmp_path / "laid")
    code, out, err = run_cli("reshard", src, dst, "--for-world", str(world), "--layout", f"shard{dim}")
    assert code == 0, err
    assert f"laid out for Shard({dim}) over {world} ranks" in out
    assert run_cli("diff", src, dst)[0] == 0
    m = CheckpointReader(dst).manifest
    assert m.topology["laid_out_for"] == {"world_size": world, "shard_dim": dim}
    assert m.tensors["w"].layout == f"Shard({dim}) over {world} ranks (offline layout)"
    layout = TargetLayout(world, dim)
    settings = ReadSettings(m.block_bytes, True, LoadOptions().max_gap_bytes, LoadOptions().max_read_bytes)
    rank_objects = set()
    for r in range(world):
        needs = []
        for key, rec in m.tensors.items():
            box = layout.shard(rec.shape, r)
            if box is None or box.is_empty() or rec.nbytes == 0:
                continue
            got, covered = intersect_chunks(key, 0, box, rec.chunks, rec.dtype.itemsize, settings.max_gap_bytes)
            assert covered == box.numel
            needs += got
        if not needs:
            continue
        reads = plan_reads(needs, settings, lambda n: True)
        objects = {rd.object for rd in reads}
        assert len(objects) == 1, f"rank {r} reads {objects}"
        spans = sorted((rd.start, rd.stop) for rd in reads)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), f"rank {r}: gaps in {spans}"
        rank_objects |= objects
    assert len(rank_objects) == sum(1 for r in range(world) if layout.shard((10, 7, 9), r).sizes[dim] > 0)
    # and a target-topology read of a rank's box returns exactly the original slice
    reader = CheckpointReader(dst)
    for r in range(world):
        box = layout.shard(sd["w"].shape, r)
        if box is not None and not box.is_empty():
            assert torch.equal(reader.read("w", box), sd["w"][box.slices()])


def test_memory_urls_end_to_end():
    root = "memory://cli-test/run"
    for step in (1, 2):
        ckpt.save(state(step), f"{root}/step-{step}", step=step)
    code, out, _ = run_cli("ls", root, "--json")
    assert code == 0 and [e["name"] for e in json.loads(out)] == ["step-1", "step-2"]
    assert run_cli("verify", f"{root}/step-2")[0] == 0
    assert run_cli("info", f"{root}/step-2", "--json")[0] == 0
    code, _, err = run_cli("export", f"{root}/step-2", "memory://cli-test/hf", "--to", "safetensors")
    assert code == 0, err
    code, _, err = run_cli("convert", "memory://cli-test/hf", "memory://cli-test/back")
    assert code == 0, err
    code, out, _ = run_cli("diff", f"{root}/step-2", "memory://cli-test/back", "--json")
    assert code == 0 and json.loads(out)["equal"], out
    code, _, err = run_cli("export", f"{root}/step-2", "memory://cli-test/d", "--to", "dcp")
    assert code == 0, err
    assert run_cli("diff", "memory://cli-test/d", f"{root}/step-2")[0] == 0
    for to, dst in (("safetensors", "memory://cli-test/one.safetensors"), ("torch", "memory://cli-test/x.pt")):
        code, _, err = run_cli("export", f"{root}/step-2", dst, "--to", to)
        assert code == 0, err
        code, out, _ = run_cli("diff", dst, f"{root}/step-2", "--json")
        assert code == 0 and json.loads(out)["equal"], (to, out)  # values kept too
    assert run_cli("gc", root, "--keep-last", "1", "--yes")[0] == 0
    code, out, _ = run_cli("ls", root, "--json")
    assert [e["name"] for e in json.loads(out)] == ["step-2"]
    fsspec.filesystem("memory").rm("/cli-test", recursive=True)


def test_merge_subcommand_is_wired(tmp_path):
    a, b, out = (str(tmp_path / n) for n in ("a", "b", "avg"))
    ckpt.save({"w": torch.full((4, 3), 1.0), "step": 1}, a, step=1)
    ckpt.save({"w": torch.full((4, 3), 3.0), "step": 2}, b, step=2)
    code, _, err = run_cli("merge", a, b, "-o", out, "--no-progress")
    assert code == 0, err
    assert torch.equal(CheckpointReader(out).read("w"), torch.full((4, 3), 2.0))
    assert run_cli("verify", out)[0] == 0
