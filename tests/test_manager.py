"""ckpt.Manager: retention, latest marker, restore, preemption, kill -9 resume, RAM tier."""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from daemon_util import running_daemon
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt
import ckpt.ramtier
from ckpt.options import LoadOptions, RetentionPolicy
from ckpt.retention import CheckpointInfo, order_key, select_deletions

HERE = os.path.dirname(__file__)


# -- the pure rule ------------------------------------------------------------------------------


infos = st.lists(
    st.builds(
        lambda step, committed, loss, age: CheckpointInfo(
            f"step-{step:08d}", step, committed, 1000.0 - age, (("loss", loss),) if loss is not None else ()
        ),
        st.integers(0, 50),
        st.booleans(),
        st.one_of(st.none(), st.floats(0, 10)),
        st.floats(0, 500),
    ),
    unique_by=lambda c: c.name,
    max_size=12,
)
policies = st.builds(
    RetentionPolicy,
    keep_last=st.one_of(st.none(), st.integers(1, 4)),
    keep_best=st.one_of(st.none(), st.integers(1, 3)),
    best_metric=st.just("loss"),
    best_mode=st.sampled_from(["min", "max"]),
    keep_every=st.one_of(st.none(), st.integers(1, 10)),
    keep_within_s=st.one_of(st.none(), st.floats(0, 300)),
)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(infos, policies, st.data())
def test_retention_never_deletes_newest_committed_or_in_flight(cps, policy, data):
    in_flight = frozenset(data.draw(st.lists(st.sampled_from([c.name for c in cps]), max_size=3)) if cps else [])
    doomed = set(select_deletions(cps, policy, now=1000.0, in_flight=in_flight))
    committed = sorted((c for c in cps if c.committed), key=order_key, reverse=True)
    if committed:
        assert committed[0].name not in doomed
    assert not doomed & in_flight
    kept = [c for c in committed if c.name not in doomed]
    if policy.keep_last:
        assert {c.name for c in committed[: policy.keep_last]} <= {c.name for c in kept}
    if policy.keep_every:
        assert all(c.name not in doomed for c in committed if c.step % policy.keep_every == 0)
    if policy.keep_best:
        scored = [c for c in committed if c.metric("loss") is not None]
        if scored:
            best = (min if policy.best_mode == "min" else max)(c.metric("loss") for c in scored)
            assert any(c.metric("loss") == best for c in kept)
    if not committed:
        assert not doomed


def test_retention_deletes_abandoned_incomplete_only_when_older():
    cps = [
        CheckpointInfo("step-00000001", 1, True),
        CheckpointInfo("step-00000002", 2, False),
        CheckpointInfo("step-00000003", 3, True),
        CheckpointInfo("step-00000004", 4, False),
    ]
    assert select_deletions(cps, RetentionPolicy(), now=0) == ["step-00000002"]
    assert select_deletions(cps, RetentionPolicy(keep_last=1), now=0) == ["step-00000001", "step-00000002"]


# -- single process -------------------------------------------------------------------------------


def _state(value: float) -> dict:
    return {"w": torch.full((64, 64), value), "step": int(value)}


def test_saves_every_n_steps_marks_latest_and_applies_retention(tmp_path):
    root = str(tmp_path)
    losses = {0: 5.0, 2: 1.0, 4: 4.0, 6: 3.0, 8: 6.0}
    retention = ckpt.RetentionPolicy(keep_last=2, keep_best=1, best_metric="loss")
    mgr = ckpt.Manager(root, every_steps=2, retention=retention, handle_sigterm=False)
    for step in range(9):
        mgr.maybe_save(step, _state(step), metrics={"loss": losses.get(step, 9.0)})
    mgr.close()
    names = sorted(n for n in os.listdir(root) if n.startswith("step-"))
    assert names == ["step-00000002", "step-00000006", "step-00000008"]  # best (loss 1) + last two
    assert mgr.latest == "step-00000008"
    target = _state(-1)
    assert ckpt.Manager(root, handle_sigterm=False).restore(target) == 9
    assert torch.equal(target["w"], torch.full((64, 64), 8.0)) and target["step"] == 8


def test_retention_waits_for_commit_under_concurrent_async_saves(tmp_path, monkeypatch):
    """Deletions follow commits: while saves persist slowly, nothing newer-than-committed
    is assumed, the latest marker only ever names a committed checkpoint, and the
    newest committed one always survives."""
    import ckpt.engine as engine

    real = engine.write_rank

    def slow_write_rank(*a, **k):
        time.sleep(0.15)
        return real(*a, **k)

    monkeypatch.setattr(engine, "write_rank", slow_write_rank)
    root = str(tmp_path)
    mgr = ckpt.Manager(root, every_steps=1, retention=ckpt.RetentionPolicy(keep_last=1), handle_sigterm=False)
    seen_latest, broken = [], []
    stop = threading.Event()

    def watch() -> None:  # what it finds goes to ``broken``: an assert here would only end this thread
        while not stop.is_set():
            latest = mgr.latest
            if latest is not None:
                # named while uncommitted or after deletion; not: moved on (and the old one retired) meanwhile
                if not os.path.exists(os.path.join(root, latest, "manifest.json")) and mgr.latest == latest:
                    broken.append(f"the latest marker names {latest}, which has no manifest")
                seen_latest.append(latest)
            committed = glob.glob(os.path.join(root, "step-*", "manifest.json"))
            if seen_latest and not committed:
                broken.append("every committed checkpoint was deleted")
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for step in range(6):
            mgr.maybe_save(step, _state(step))
        mgr.close()
    finally:
        stop.set()
        watcher.join()
    assert not broken, broken
    assert seen_latest, "the marker never appeared"
    assert sorted(n for n in os.listdir(root) if n.startswith("step-")) == ["step-00000005"]


def test_restore_skips_incomplete_and_corrupt_with_reasons(tmp_path, caplog):
    root = str(tmp_path)
    for step in (1, 2, 3):
        ckpt.save(_state(step), f"{root}/step-{step:08d}", step=step)
    data = glob.glob(f"{root}/step-00000003/data/*")[0]
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) - 10)
        f.write(b"\x00" * 4)
    os.makedirs(f"{root}/step-00000004/data")
    with open(f"{root}/step-00000004/data/partial.safetensors", "wb") as f:
        f.write(b"half")
    target = _state(-1)
    with caplog.at_level(logging.WARNING, logger="ckpt.manager"):
        assert ckpt.Manager(root, handle_sigterm=False).restore(target) == 3
    assert torch.equal(target["w"], torch.full((64, 64), 2.0))
    text = caplog.text
    assert "step-00000004: incomplete" in text
    assert "step-00000003: CorruptChunkError" in text


def test_restore_on_empty_root_is_a_fresh_start(tmp_path):
    mgr = ckpt.Manager(str(tmp_path), handle_sigterm=False)
    assert mgr.restore(_state(0)) is None and mgr.latest_step() is None and mgr.all_steps() == []


def test_restore_a_chosen_step_and_list_steps(tmp_path):
    mgr = ckpt.Manager(str(tmp_path), every_steps=3, handle_sigterm=False)
    for step in range(8):
        mgr.maybe_save(step, _state(step))
    mgr.close()
    assert mgr.all_steps() == [0, 3, 6] and mgr.latest_step() == 6
    target = _state(-1)
    assert mgr.restore(target, step=3) == 4 and target["step"] == 3
    assert torch.equal(target["w"], torch.full((64, 64), 3.0))
    with pytest.raises(ckpt.CheckpointNotFoundError, match=r"no committed checkpoint at step 4 \(steps: \[0, 3, 6\]\)"):
        mgr.restore(target, step=4)


def test_sigterm_triggers_an_emergency_save_at_the_next_boundary(tmp_path):
    root = str(tmp_path)
    mgr = ckpt.Manager(root, every_steps=100, preemption_deadline_s=30)
    try:
        assert mgr.maybe_save(1, _state(1)) is None
        os.kill(os.getpid(), signal.SIGTERM)
        handle = mgr.maybe_save(2, _state(2))
        assert handle is not None and handle.done()
        assert mgr.should_stop
        assert mgr.latest == "step-00000002"
    finally:
        mgr.close()
    assert signal.getsignal(signal.SIGTERM) is not mgr._on_sigterm


def test_save_now_saves_off_schedule(tmp_path):
    mgr = ckpt.Manager(str(tmp_path), every_steps=100, handle_sigterm=False)
    mgr.save_now()
    assert mgr.maybe_save(7, _state(7)) is not None
    mgr.close()
    assert mgr.latest == "step-00000007"


def test_a_failed_background_save_surfaces_on_the_next_call(tmp_path, monkeypatch):
    import ckpt.engine as engine

    def broken(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(engine, "write_rank", broken)
    mgr = ckpt.Manager(str(tmp_path), every_steps=1, handle_sigterm=False)
    mgr.maybe_save(0, _state(0))
    with pytest.raises(OSError, match="disk on fire"):
        mgr.wait()
    mgr.close()
    assert mgr.latest is None


# -- kill -9 at random points, across runs ------------------------------------------------------


def _launch(world: int, store: str, root: str, log: str, steps: int, sleep: float) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = os.path.join(HERE, "manager_train.py")
    return [
        subprocess.Popen(
            [sys.executable, script, "--rank", str(r), "--world", str(world), "--store", store, "--root", root]
            + ["--steps", str(steps), "--log", log, "--every", "2", "--step-sleep", str(sleep)],
            env=env,
        )
        for r in range(world)
    ]


def _count_lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _losses(log: str) -> dict[int, str]:
    out: dict[int, str] = {}
    with open(log) as f:
        for line in f:
            step, loss = line.split()
            out[int(step)] = loss  # a resumed run overwrites the steps it redoes
    return out


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.faults
def test_killed_training_always_resumes_from_newest_committed_with_identical_losses(tmp_path):
    steps, world = 16, 2
    ref_log = str(tmp_path / "ref.log")
    procs = _launch(world, str(tmp_path / "ref.store"), str(tmp_path / "ref"), ref_log, steps, 0.0)
    assert all(p.wait(timeout=240) == 0 for p in procs)
    reference = _losses(ref_log)
    assert sorted(reference) == list(range(steps))

    rng = random.Random(1234)
    root, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    kills = 0
    for attempt in range(6):
        store = str(tmp_path / f"store{attempt}")
        lines_before = _count_lines(log)
        procs = _launch(world, store, root, log, steps, 0.05)
        if kills < 3:
            # Kill after a random amount of progress (machine-speed independent), mid-step.
            target = lines_before + rng.randint(1, 4)
            deadline = time.monotonic() + 180
            while _count_lines(log) < target and time.monotonic() < deadline:
                if all(p.poll() is not None for p in procs):
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.1))
        if kills >= 3 or any(p.poll() is not None for p in procs):
            assert all(p.wait(timeout=240) == 0 for p in procs)
            break
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
        kills += 1
        # Whatever the kill interrupted, what is visible is committed and loadable.
        latest_path = os.path.join(root, "latest")
        if os.path.exists(latest_path):
            with open(latest_path) as f:
                latest = json.load(f)["name"]
            assert os.path.exists(os.path.join(root, latest, "manifest.json"))
        for manifest in glob.glob(os.path.join(root, "step-*", "manifest.json")):
            ckpt.load({}, os.path.dirname(manifest), strict=False)
    assert kills >= 3, "the runs finished before they could be killed"
    assert _losses(log) == reference


# -- RAM tier ----------------------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path):
    with running_daemon("--ram-tier-dir", str(tmp_path / "ram")) as d:
        yield d.address


@pytest.mark.daemon
def test_restore_through_the_ram_tier_and_with_it_cleared(tmp_path, daemon, monkeypatch):
    root = str(tmp_path / "run")
    mgr = ckpt.Manager(root, every_steps=1, save_options=ckpt.SaveOptions(daemon=daemon), handle_sigterm=False)
    for step in range(3):
        mgr.maybe_save(step, {"w": torch.randn(256, 256, generator=torch.Generator().manual_seed(step)), "step": step})
    mgr.close()
    expected = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))

    served = []
    real = ckpt.ramtier.RamTierStorage.read_into_many

    def spy(self, rel, start, bufs):
        served.append((rel in self.objects, sum(len(b) for b in bufs)))
        return real(self, rel, start, bufs)

    monkeypatch.setattr(ckpt.ramtier.RamTierStorage, "read_into_many", spy)
    restore = ckpt.Manager(root, load_options=LoadOptions(daemon=daemon), handle_sigterm=False)
    target = {"w": torch.zeros(256, 256), "step": -1}
    assert restore.restore(target) == 3
    assert torch.equal(target["w"], expected)
    assert served and all(from_ram for from_ram, _ in served), "the RAM tier did not serve the restore"

    from ckpt._proto import ckpt_pb2
    from ckpt.client import daemon_channel

    daemon_channel(daemon).stub.ClearRamTier(ckpt_pb2.ClearRequest())
    served.clear()
    target = {"w": torch.zeros(256, 256), "step": -1}
    assert restore.restore(target) == 3
    assert torch.equal(target["w"], expected)
    assert not served, "a cleared RAM tier still served bytes"
    restore.close()


@pytest.mark.daemon
def test_stale_ram_copy_is_not_used(tmp_path, daemon):
    """A checkpoint overwritten behind the daemon's back is read from storage."""
    uri = str(tmp_path / "run" / "step-00000001")
    ckpt.save({"w": torch.ones(32)}, uri, options=ckpt.SaveOptions(daemon=daemon))
    ckpt.save({"w": torch.full((32,), 2.0)}, uri, options=ckpt.SaveOptions(overwrite=True))  # not via the daemon
    target = {"w": torch.zeros(32)}
    ckpt.load(target, uri, options=LoadOptions(daemon=daemon))
    assert torch.equal(target["w"], torch.full((32,), 2.0))


def test_restore_raises_a_mismatch_instead_of_starting_over(tmp_path):
    """Issue 11: a target that does not match (a renamed key, a fresh optimizer's missing state) made
    restore skip every good checkpoint and return None; the job then started from scratch over its run."""
    root = str(tmp_path)
    for step in (1, 2):
        ckpt.save(_state(step), f"{root}/step-{step:08d}", step=step)
    mgr = ckpt.Manager(root, handle_sigterm=False)
    try:
        target = {"w": torch.zeros(64, 64), "step": 0, "optim": {"lr": 0.1}}
        with pytest.raises(ckpt.StateDictMismatchError, match=r"optim\.lr: missing from the checkpoint"):
            mgr.restore(target)
        assert torch.equal(target["w"], torch.zeros(64, 64))
        with pytest.raises(ckpt.StateDictMismatchError, match="shape"):
            mgr.restore({"w": torch.zeros(32, 64), "step": 0})
        assert sorted(os.listdir(root)) == ["_owner.json", "step-00000001", "step-00000002"]  # + the job's lease
    finally:
        mgr.close()


def test_retention_keeps_checkpoints_newer_than_the_restored_one_until_the_job_passes_them(tmp_path, caplog):
    """The newest checkpoint does not load (corrupt), so the job restores step 2 and saves 3, 4, ...
    with keep_last=2. The skipped step 10 is kept, and does not push the job's own saves out, until
    the job commits a step past it; then retention treats it like any other."""
    root = str(tmp_path)
    for step in (1, 2, 10):
        ckpt.save(_state(step), f"{root}/step-{step:08d}", step=step)
    data = glob.glob(f"{root}/step-00000010/data/*")[0]
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) - 8)
        f.write(b"\xff" * 4)
    mgr = ckpt.Manager(root, every_steps=1, retention=RetentionPolicy(keep_last=2), handle_sigterm=False)
    try:
        target = _state(-1)
        with caplog.at_level(logging.WARNING, logger="ckpt.manager"):
            assert mgr.restore(target) == 3
        assert "step-00000010: CorruptChunkError" in caplog.text
        for step in range(3, 10):
            mgr.maybe_save(step, _state(step))
            mgr.wait()
            names = sorted(n for n in os.listdir(root) if n.startswith("step-"))
            assert "step-00000010" in names, (step, names)
            assert f"step-{step:08d}" in names and f"step-{step - 1:08d}" in names, (step, names)
        for step in (11, 12):
            mgr.maybe_save(step, _state(step))
        mgr.wait()
    finally:
        mgr.close()
    assert sorted(n for n in os.listdir(root) if n.startswith("step-")) == ["step-00000011", "step-00000012"]


def test_a_fresh_start_over_unloadable_checkpoints_keeps_them_and_its_own_saves(tmp_path):
    """Every checkpoint of the run is corrupt: the job starts fresh (None), and retention neither deletes
    the old run's checkpoints nor lets their higher steps crowd out the new run's saves (keep_last=1
    used to keep step 200 and delete each new save)."""
    root = str(tmp_path)
    for step in (100, 200):
        ckpt.save(_state(step), f"{root}/step-{step:08d}", step=step)
        data = glob.glob(f"{root}/step-{step:08d}/data/*")[0]
        with open(data, "r+b") as f:
            f.seek(os.path.getsize(data) - 8)
            f.write(b"\xff" * 4)
    mgr = ckpt.Manager(root, every_steps=1, retention=RetentionPolicy(keep_last=1), handle_sigterm=False)
    try:
        assert mgr.restore(_state(-1)) is None
        for step in (1, 2, 3):
            mgr.maybe_save(step, _state(step))
            mgr.wait()
    finally:
        mgr.close()
    names = sorted(n for n in os.listdir(root) if n.startswith("step-"))
    assert names == ["step-00000003", "step-00000100", "step-00000200"], names
    target = _state(-1)
    assert ckpt.Manager(root, handle_sigterm=False).restore(target) == 4 and target["step"] == 3
