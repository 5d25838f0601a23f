"""In-process ``ckpt.async_save``: what a training loop relies on.

The snapshot owns its bytes when ``async_save`` returns (later updates never leak
into the checkpoint), persistence runs behind the loop and reports failures
through ``wait()``, the staging buffer is allocated once per structure, a save
that finds the previous one still persisting waits or is refused, and a lazy
snapshot holds back the optimizer step until its copy is done.

Persistence and staging are made slow *deterministically* by gating them on an
event (monkeypatching the function the library calls), never by sleeping and
hoping: every ordering a test asserts is forced.
"""

from __future__ import annotations

import importlib
import threading
import uuid
from collections.abc import Iterator

import pytest
import torch
from helpers import bits, manifest_of, random_tensor

import ckpt
import ckpt.persist
from ckpt import SaveBusyError, SaveOptions
from ckpt.format import MANIFEST

# ``ckpt.save`` is the function; the module behind it holds what these tests patch.
save_module = importlib.import_module("ckpt.save")
stage_module = importlib.import_module("ckpt.stage")

GATE_S = 60.0  # how long a gated phase waits before the test gives up


def make_state(tag: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state of mixed dtypes whose key names are unique to the test, so the
    library's per-structure plan and buffer caches start empty for it."""
    return {
        f"{tag}.w": random_tensor((64, 48), torch.float32, seed),
        f"{tag}.b": random_tensor((48,), torch.bfloat16, seed + 1),
        f"{tag}.i": random_tensor((5, 7), torch.int64, seed + 2),
        f"{tag}.h": random_tensor((3, 33), torch.float16, seed + 3),
    }


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def load_state(like: dict[str, torch.Tensor], uri: str) -> dict[str, torch.Tensor]:
    target = {k: torch.zeros_like(v) for k, v in like.items()}
    ckpt.load(target, uri)
    return target


def assert_state_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(bits(got[k]), bits(want[k])), f"{k} differs"


def tag() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


class Gate:
    """Holds a phase at its start until ``open()``; ``entered`` is set when it arrives."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self._open = threading.Event()
        self.calls = 0

    def wrap(self, fn):
        def gated(*args, **kwargs):
            self.calls += 1
            self.entered.set()
            if not self._open.wait(GATE_S):
                raise TimeoutError("test gate never opened")
            return fn(*args, **kwargs)

        return gated

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def persist_gate(monkeypatch) -> Iterator[Gate]:
    """Background persistence blocks until the test opens the gate."""
    gate = Gate()
    monkeypatch.setattr(ckpt.persist, "persist_rank", gate.wrap(ckpt.persist.persist_rank))
    yield gate
    gate.open()  # never leave a persister thread stuck


@pytest.fixture
def stage_gate(monkeypatch) -> Iterator[Gate]:
    """The snapshot copy blocks until the test opens the gate."""
    gate = Gate()
    monkeypatch.setattr(save_module, "stage", gate.wrap(save_module.stage))
    yield gate
    gate.open()


@pytest.fixture
def allocations(monkeypatch) -> list[stage_module.HostBuffer]:
    """Every staging buffer the save path allocates from now on, in order."""
    made: list[stage_module.HostBuffer] = []
    real_buffer = stage_module.HostBuffer

    def counting(*args, **kwargs):
        made.append(real_buffer(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(stage_module, "HostBuffer", counting)
    return made


def still_blocked(t: threading.Thread, s: float = 0.3) -> bool:
    t.join(s)
    return t.is_alive()


# -- snapshot semantics ---------------------------------------------------------------------


def test_mutation_after_async_save_returns_is_not_saved(tmp_path, persist_gate):
    state = make_state(tag())
    want = clone_state(state)
    uri = str(tmp_path / "c")
    h = ckpt.async_save(state, uri, step=7)
    # async_save returned while persistence is held back: it did not wait for it.
    assert persist_gate.entered.wait(GATE_S)
    assert not h.done()
    for v in state.values():  # what a training step does to parameters and optimizer state
        v.view(torch.uint8).bitwise_not_()
    persist_gate.open()
    assert h.wait(timeout=GATE_S) == h.save_id
    assert h.done()
    assert_state_bitwise(load_state(want, uri), want)
    assert manifest_of(uri).step == 7


def _stored(record) -> list[tuple]:
    """What a tensor's chunks hold, independent of which object/offset they landed in."""
    return [(c.box, c.length, c.checksums) for c in record.chunks]


def test_save_equals_async_save_then_wait(tmp_path):
    state = make_state(tag(), seed=3)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    save_id = ckpt.save(state, a, step=1)
    h = ckpt.async_save(state, b, step=1)
    assert h.wait() == h.save_id
    ma, mb = manifest_of(a), manifest_of(b)
    assert ma.save_id == save_id
    assert ma.tensors.keys() == mb.tensors.keys()
    for k in ma.tensors:
        ra, rb = ma.tensors[k], mb.tensors[k]
        assert (ra.shape, ra.dtype) == (rb.shape, rb.dtype)
        assert _stored(ra) == _stored(rb)
    assert_state_bitwise(load_state(state, a), state)
    assert_state_bitwise(load_state(state, b), state)


def test_handle_done_wait_and_per_phase_timings(tmp_path, persist_gate):
    state = make_state(tag())
    uri = str(tmp_path / "c")
    h = ckpt.async_save(state, uri)
    assert persist_gate.entered.wait(GATE_S)
    assert not h.done()
    with pytest.raises(TimeoutError):
        h.wait(timeout=0.05)
    assert {"plan", "stage"} <= h.timings.keys()
    persist_gate.open()
    assert h.wait(timeout=GATE_S) == manifest_of(uri).save_id
    assert h.done()
    assert {"plan", "stage", "serialize", "upload", "commit"} <= h.timings.keys()
    assert all(v >= 0.0 for v in h.timings.values())
    assert h.timings["stage"] > 0.0 and h.timings["upload"] > 0.0


def test_persistence_failure_is_reraised_by_wait_and_next_save_works(tmp_path):
    state = make_state(tag())
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a file where the checkpoint directory should go")
    bad = str(blocker / "c")  # unwritable even for root: its parent is a regular file
    h = ckpt.async_save(state, bad)  # the snapshot succeeds; writing fails behind the loop
    with pytest.raises(OSError):
        h.wait(timeout=GATE_S)
    assert h.done()
    # The failure released the staging buffer: the next save of the same structure proceeds.
    good = str(tmp_path / "ok")
    ckpt.async_save(state, good, options=SaveOptions(on_busy="refuse")).wait(timeout=GATE_S)
    assert_state_bitwise(load_state(state, good), state)


def test_staging_buffer_is_allocated_once_and_reused(tmp_path, monkeypatch, allocations):
    staged_at: list[list[int]] = []
    real_submit = ckpt.persist.InProcessPersister.submit

    def spying(self, job, timings, release, buf=None, **kwargs):
        staged_at.append(sorted(c.data.data_ptr() for c in job.chunks))
        return real_submit(self, job, timings, release, buf, **kwargs)

    monkeypatch.setattr(ckpt.persist.InProcessPersister, "submit", spying)

    t = tag()
    states = [make_state(t, seed=10 * i) for i in range(3)]
    for i, s in enumerate(states):
        ckpt.async_save(s, str(tmp_path / f"s{i}")).wait()
    assert len(allocations) == 1, "a save of an already-seen structure allocated a new staging buffer"
    buf = allocations[0].data
    assert staged_at[0] == staged_at[1] == staged_at[2]
    assert all(buf.data_ptr() <= p < buf.data_ptr() + buf.numel() for p in staged_at[0])
    for i, s in enumerate(states):  # reuse never mixes one save's bytes into another
        assert_state_bitwise(load_state(s, str(tmp_path / f"s{i}")), s)
    # A different structure gets its own buffer.
    ckpt.async_save(make_state(tag()), str(tmp_path / "other")).wait()
    assert len(allocations) == 2


def test_buffers_of_structures_not_saved_lately_are_freed(tmp_path, monkeypatch):
    """A job that saves many distinct structures keeps only the most recently used staging
    buffers (each is as large as the rank's state); the others are closed and dropped."""
    monkeypatch.setattr(save_module, "_staging_buffers", stage_module.BufferCache(keep=2))
    closed: list[stage_module.HostBuffer] = []
    real_close = stage_module.HostBuffer.close

    def spying_close(self):
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(stage_module.HostBuffer, "close", spying_close)
    a, b, c = (make_state(tag(), seed=i) for i in range(3))
    ckpt.async_save(a, str(tmp_path / "a0")).wait()
    ckpt.async_save(b, str(tmp_path / "b0")).wait()
    buffers = save_module._staging_buffers.buffers()
    assert closed == []
    ckpt.async_save(a, str(tmp_path / "a1")).wait()  # a is now the most recently used
    ckpt.async_save(c, str(tmp_path / "c0")).wait()  # so b's buffer goes
    assert closed == [buffers[1]]
    assert save_module._staging_buffers.buffers()[0] is buffers[0]
    ckpt.async_save(b, str(tmp_path / "b1")).wait()  # b again: a fresh buffer, a (least recent) goes
    assert closed == [buffers[1], buffers[0]]
    for name, state in (("a1", a), ("b1", b), ("c0", c)):
        assert_state_bitwise(load_state(state, str(tmp_path / name)), state)


def test_a_buffer_still_persisting_is_not_freed(tmp_path, persist_gate, monkeypatch):
    monkeypatch.setattr(save_module, "_staging_buffers", stage_module.BufferCache(keep=1))
    a, b = make_state(tag(), seed=1), make_state(tag(), seed=2)
    want_a = clone_state(a)
    h = ckpt.async_save(a, str(tmp_path / "a"))
    assert persist_gate.entered.wait(GATE_S)  # a's bytes are still being persisted
    a_buf = save_module._staging_buffers.buffers()[0]
    hb = ckpt.async_save(b, str(tmp_path / "b"))  # over the limit, but a's buffer is busy
    assert any(buf is a_buf for buf in save_module._staging_buffers.buffers())
    persist_gate.open()
    h.wait(timeout=GATE_S)
    hb.wait(timeout=GATE_S)
    assert_state_bitwise(load_state(want_a, str(tmp_path / "a")), want_a)
    assert_state_bitwise(load_state(b, str(tmp_path / "b")), b)
    ckpt.async_save(b, str(tmp_path / "b2")).wait()  # a is idle now: the next save frees it
    assert all(buf is not a_buf for buf in save_module._staging_buffers.buffers())


def test_on_busy_refuse_raises_while_previous_save_persists(tmp_path, persist_gate):
    t = tag()
    first, second = make_state(t, seed=1), make_state(t, seed=2)
    h = ckpt.async_save(first, str(tmp_path / "a"))
    assert persist_gate.entered.wait(GATE_S)
    with pytest.raises(SaveBusyError, match="still persisting"):
        ckpt.async_save(second, str(tmp_path / "b"), options=SaveOptions(on_busy="refuse"))
    persist_gate.open()
    h.wait(timeout=GATE_S)
    # Refusal wrote nothing, and once the first save is done the same call succeeds.
    assert not (tmp_path / "b" / MANIFEST).exists()
    ckpt.async_save(second, str(tmp_path / "b"), options=SaveOptions(on_busy="refuse")).wait(timeout=GATE_S)
    assert_state_bitwise(load_state(first, str(tmp_path / "a")), first)
    assert_state_bitwise(load_state(second, str(tmp_path / "b")), second)


def test_on_busy_wait_waits_for_previous_save(tmp_path, persist_gate):
    t = tag()
    first, second = make_state(t, seed=1), make_state(t, seed=2)
    want_second = clone_state(second)
    h1 = ckpt.async_save(first, str(tmp_path / "a"))
    assert persist_gate.entered.wait(GATE_S)
    handles: list[ckpt.SaveHandle] = []
    caller = threading.Thread(target=lambda: handles.append(ckpt.async_save(second, str(tmp_path / "b"))))
    caller.start()
    assert still_blocked(caller), "on_busy='wait' returned while the previous save still held the buffer"
    assert not h1.done()
    persist_gate.open()
    caller.join(GATE_S)
    assert not caller.is_alive() and len(handles) == 1
    for v in second.values():  # the second snapshot was taken when its call returned
        v.zero_()
    h1.wait(timeout=GATE_S)
    handles[0].wait(timeout=GATE_S)
    assert_state_bitwise(load_state(first, str(tmp_path / "a")), first)
    assert_state_bitwise(load_state(want_second, str(tmp_path / "b")), want_second)


def _refuse_on_one_rank(rank: int, world: int, root: str) -> dict:
    """Rank 1's persistence of save A lingers after its data is durable (gate file);
    save B is refused there while rank 0 proceeds."""
    import os
    import time

    if rank == 1:
        real = ckpt.persist.persist_rank

        def lingering(job, timings):
            real(job, timings)
            deadline = time.monotonic() + GATE_S
            while not os.path.exists(f"{root}/release") and time.monotonic() < deadline:
                time.sleep(0.01)

        ckpt.persist.persist_rank = lingering
    state = make_state("refuse", seed=rank)
    options = SaveOptions(on_busy="refuse", commit_timeout_s=120)
    h = ckpt.async_save(state, f"{root}/a", options=options)
    if rank == 0:
        h.wait()  # committed: rank 1's data is durable, only its persister thread lingers
    out: dict = {}
    t0 = time.monotonic()
    try:
        ckpt.async_save(state, f"{root}/b", options=options).wait()
        out["b"] = "committed"
    except (SaveBusyError, ckpt.SaveAbortedError) as e:
        out["b"] = f"{type(e).__name__}: {e}"
    out["b_s"] = time.monotonic() - t0
    if rank == 1:
        open(f"{root}/release", "w").close()
        h.wait()
    ckpt.async_save(state, f"{root}/c", options=SaveOptions(commit_timeout_s=120)).wait()
    return out


@pytest.mark.dist
def test_a_save_refused_on_one_rank_aborts_the_others_promptly(tmp_path):
    from dist import run_ranks

    r0, r1 = run_ranks(_refuse_on_one_rank, 2, str(tmp_path), start_method="forkserver", timeout=240)
    assert r1["b"].startswith("SaveBusyError"), r1
    assert r0["b"].startswith("SaveAbortedError") and "SaveBusyError" in r0["b"], r0
    assert r0["b_s"] < 60, "rank 0 learnt of rank 1's refusal only at its commit timeout"
    assert not (tmp_path / "b" / MANIFEST).exists()
    assert (tmp_path / "a" / MANIFEST).exists() and (tmp_path / "c" / MANIFEST).exists()


# -- lazy snapshots -------------------------------------------------------------------------


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_step(model, opt)  # AdamW state (exp_avg, exp_avg_sq, step) now exists
    return model, opt


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(16, 32)).square().mean().backward()
    opt.step()


def _training_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def _tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state, cloned, by path."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_tensors(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v.detach().clone()
    return out


def _load_training_state(uri: str, seed: int) -> dict:
    model, opt = _model_and_optimizer(seed + 1000)  # different values, same structure
    state = _training_state(model, opt)
    ckpt.load(state, uri)
    return state


def test_lazy_save_returns_at_once_and_the_guarded_step_waits_for_the_copy(tmp_path, stage_gate):
    model, opt = _model_and_optimizer(seed=1)
    want = _tensors(_training_state(model, opt))
    uri = str(tmp_path / "lazy")
    h = ckpt.async_save(_training_state(model, opt), uri, step=5, lazy=True, guard=opt)
    # Returned although the copy has not even started.
    assert stage_gate.entered.wait(GATE_S)
    assert not h.done()
    # Forward and backward overlap the copy; the optimizer step must wait for it.
    opt.zero_grad()
    model(torch.randn(16, 32)).square().mean().backward()
    stepper = threading.Thread(target=opt.step)
    stepper.start()
    assert still_blocked(stepper), "optimizer.step changed parameters before the lazy snapshot was taken"
    assert_state_bitwise(_tensors(_training_state(model, opt)), want)
    stage_gate.open()
    stepper.join(GATE_S)
    assert not stepper.is_alive()
    assert not torch.equal(model[0].weight, want["model.0.weight"]), "the step did not run"
    # Training continues; the checkpoint holds the state at the call.
    for _ in range(3):
        _train_step(model, opt)
    h.wait(timeout=GATE_S)
    assert_state_bitwise(_tensors(_load_training_state(uri, seed=1)), want)


def test_lazy_save_with_training_running_on_saves_state_at_call(tmp_path):
    """No gate: the guard alone keeps training from racing the copy."""
    model, opt = _model_and_optimizer(seed=2)
    want = _tensors(_training_state(model, opt))
    uri = str(tmp_path / "lazy")
    h = ckpt.async_save(_training_state(model, opt), uri, lazy=True, guard=opt)
    for _ in range(3):
        _train_step(model, opt)
    h.wait(timeout=GATE_S)
    assert_state_bitwise(_tensors(_load_training_state(uri, seed=2)), want)


def test_lazy_guard_coexists_with_other_step_hooks_across_saves(tmp_path):
    """The guard must not break optimizers that carry other step hooks (schedulers,
    profilers, ...), nor a second lazy save registered before the first one fired."""
    model, opt = _model_and_optimizer(seed=3)
    seen: list[int] = []
    opt.register_step_pre_hook(lambda *_: seen.append(1))
    wants, handles = [], []
    for i in range(3):
        wants.append(_tensors(_training_state(model, opt)))
        handles.append(ckpt.async_save(_training_state(model, opt), str(tmp_path / f"c{i}"), lazy=True, guard=opt))
        later = opt.register_step_pre_hook(lambda *_: seen.append(2))
        _train_step(model, opt)
        later.remove()
    assert seen == [1, 2] * 3
    for i, (h, want) in enumerate(zip(handles, wants)):
        h.wait(timeout=GATE_S)
        assert_state_bitwise(_tensors(_load_training_state(str(tmp_path / f"c{i}"), seed=3)), want)


def test_wait_staged_without_guard(tmp_path, stage_gate):
    state = make_state(tag())
    want = clone_state(state)
    uri = str(tmp_path / "c")
    h = ckpt.async_save(state, uri, lazy=True)
    assert stage_gate.entered.wait(GATE_S)
    waiter = threading.Thread(target=h.wait_staged)
    waiter.start()
    assert still_blocked(waiter), "wait_staged returned before the snapshot was taken"
    stage_gate.open()
    waiter.join(GATE_S)
    assert not waiter.is_alive()
    for v in state.values():
        v.view(torch.uint8).bitwise_not_()
    h.wait(timeout=GATE_S)
    assert_state_bitwise(load_state(want, uri), want)


def test_wait_timeout_covers_a_lazy_snapshot(tmp_path, stage_gate):
    state = make_state(tag())
    h = ckpt.async_save(state, str(tmp_path / "c"), lazy=True)
    assert stage_gate.entered.wait(GATE_S)
    with pytest.raises(TimeoutError, match="snapshot was not taken"):
        h.wait(timeout=0.1)
    assert not h.done()
    stage_gate.open()
    assert h.wait(timeout=GATE_S) == h.save_id
    assert_state_bitwise(load_state(state, str(tmp_path / "c")), state)


def test_lazy_staging_failure_is_raised_by_wait_not_by_the_training_step(tmp_path, monkeypatch):
    """A failed snapshot must not crash training at some later optimizer step: the
    guarded step goes on, and ``wait()`` (where the loop checks saves) raises."""

    def broken(*_args, **_kwargs):
        raise RuntimeError("device copy failed")

    monkeypatch.setattr(save_module, "stage", broken)
    model, opt = _model_and_optimizer(seed=4)
    uri = str(tmp_path / "c")
    h = ckpt.async_save(_training_state(model, opt), uri, lazy=True, guard=opt)
    _train_step(model, opt)
    with pytest.raises(RuntimeError, match="device copy failed"):
        h.wait(timeout=GATE_S)
    assert h.done()
    assert not (tmp_path / "c" / MANIFEST).exists()
    monkeypatch.undo()
    # The buffer was released: the next save of this structure goes through.
    want = _tensors(_training_state(model, opt))
    ckpt.async_save(_training_state(model, opt), uri, options=SaveOptions(on_busy="refuse")).wait(timeout=GATE_S)
    assert_state_bitwise(_tensors(_load_training_state(uri, seed=4)), want)


# -- CUDA (run where a GPU is present; skipped elsewhere) ---------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _slow_result(n: int = 4096, rounds: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernels queued on the current stream that take a while, and what they produce."""
    a = torch.randn(n, n, device="cuda") / n**0.5
    out = torch.empty(n, n, device="cuda")
    x = a
    for _ in range(rounds):
        x = x @ a
    out.copy_(x)
    return out, a


@needs_cuda
def test_cuda_snapshot_is_pinned_follows_queued_kernels_and_ignores_later_ones(tmp_path, allocations):
    w, _ = _slow_result()  # still being computed when async_save is called
    state = {f"{tag()}.w": w, "b": random_tensor((1000,), torch.bfloat16, 1).cuda()}
    h = ckpt.async_save(state, str(tmp_path / "c"))
    want = {k: v.cpu() for k, v in state.items()}  # what the tensors held when the call returned
    for v in state.values():
        v.view(torch.uint8).bitwise_not_()  # queued after the call: must not reach the checkpoint
    h.wait()
    assert allocations and allocations[0].data.is_pinned()
    assert_state_bitwise(load_state(want, str(tmp_path / "c")), want)


@needs_cuda
def test_cuda_lazy_snapshot_follows_the_callers_stream(tmp_path):
    """The lazy copy runs in another thread; it must still wait for the kernels the
    caller queued on its own (non-default) stream before the call."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        w, _ = _slow_result()
        key = f"{tag()}.w"
        h = ckpt.async_save({key: w}, str(tmp_path / "c"), lazy=True)
        h.wait_staged()
        want = w.cpu()
    h.wait()
    assert_state_bitwise(load_state({key: want}, str(tmp_path / "c")), {key: want})


@needs_cuda
def test_cuda_lazy_guard_holds_the_step_until_the_copy_is_done(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(2048, 2048).cuda()
    opt = torch.optim.AdamW(model.parameters())
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(64, 2048, device="cuda")).square().mean().backward()
        opt.step()
    want = _tensors(_training_state(model, opt))
    uri = str(tmp_path / "c")
    h = ckpt.async_save(_training_state(model, opt), uri, lazy=True, guard=opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(64, 2048, device="cuda")).square().mean().backward()
        opt.step()
    h.wait()
    target_model = torch.nn.Linear(2048, 2048).cuda()
    target_opt = torch.optim.AdamW(target_model.parameters())
    target_model(torch.randn(1, 2048, device="cuda")).sum().backward()
    target_opt.step()
    target = _training_state(target_model, target_opt)
    ckpt.load(target, uri)
    got = _tensors(target)
    assert_state_bitwise({k: v.cpu() for k, v in got.items()}, {k: v.cpu() for k, v in want.items()})
