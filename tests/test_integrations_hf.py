"""HF Trainer and accelerate save through ckpt and resume bitwise: a tiny Llama (from a config, with
dropout, so the RNG states matter) trains, checkpoints mid-epoch, and a fresh model resumed from that
checkpoint continues with losses and final weights identical, bit for bit, to the run that went on.
The Trainer's saves are asynchronous: what they write equals a synchronous save's, rotation never
deletes the last committed checkpoint for one still in flight, and a run killed mid-save resumes
from a committed checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
from helpers import read_all, same_bits

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

import ckpt  # noqa: E402
from ckpt.integrations import hf as ckpt_hf  # noqa: E402 - after the skips: it needs transformers

pytestmark = pytest.mark.slow  # training runs of a few seconds each

VOCAB, SEQ, ROWS, BATCH = 64, 10, 24, 4  # 6 steps an epoch


def tiny_llama(seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=0.1,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


class Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def draws() -> tuple:
    import random

    import numpy as np

    return random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), np.random.standard_normal(), torch.rand(2)


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    """Python (with a cached gauss), numpy and torch streams continue where they were saved."""
    draws()
    state = {"rng": {"0": ckpt_hf.rng_state()}}
    ckpt.save(state, str(tmp_path / "c"))
    want = draws()
    torch.manual_seed(9)
    back = {"rng": {"0": ckpt_hf.rng_state()}}
    ckpt.load(back, str(tmp_path / "c"))
    ckpt_hf.set_rng_state(back["rng"]["0"])
    got = draws()
    assert got[:4] == want[:4] and same_bits(got[4], want[4])


# --- HF Trainer ---------------------------------------------------------------------------------


def trainer(output_dir: str, model_seed: int, async_save: bool = True, **extra: Any) -> transformers.Trainer:
    class Recording(ckpt_hf.CkptTrainer):
        losses: list[torch.Tensor]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append((out[0] if return_outputs else out).detach().clone())
            return out

    args = transformers.TrainingArguments(
        output_dir=output_dir,
        max_steps=10,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=2,
        save_strategy="steps",
        save_steps=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **extra,
    )
    t = Recording(model=tiny_llama(model_seed), args=args, train_dataset=Rows())
    t.losses, t.ckpt_async_save = [], async_save
    return t


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """10 steps uninterrupted, checkpoints at steps 4 and 8 (and 10, the end)."""
    t = trainer(str(tmp_path_factory.mktemp("straight")), model_seed=0)
    t.train()
    assert len(t.losses) == 10
    return t


def same_run(straight, resumed, start: int = 4) -> None:
    assert resumed.state.global_step == 10 and len(resumed.losses) == 10 - start
    for i, (a, b) in enumerate(zip(straight.losses[start:], resumed.losses)):
        assert same_bits(a, b), f"step {i + start + 1}: {a.item()} != {b.item()}"
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert same_bits(a, b), name


def test_trainer_checkpoints_are_ckpt_and_resume_bitwise(straight, tmp_path):
    folder = os.path.join(straight.args.output_dir, "checkpoint-4")
    # the checkpoint is ckpt's (model, optimizer, scheduler, RNG) plus the Trainer's own JSON state
    assert sorted(os.listdir(folder)) == ["ckpt", "trainer_state.json"]
    saved = ckpt.read(os.path.join(folder, "ckpt"))
    assert {"model", "optimizer", "scheduler", "rng"} <= set(saved)
    assert saved["scheduler"]["last_epoch"] == 4 and len(saved["optimizer"]["state"]) > 0

    # a fresh model (other weights) in a new Trainer resumes mid-epoch: the same steps 5..10
    resumed = trainer(str(tmp_path / "b"), model_seed=1)
    assert not same_bits(resumed.model.model.embed_tokens.weight, straight.model.model.embed_tokens.weight)
    resumed.train(resume_from_checkpoint=folder)
    same_run(straight, resumed)


def complete(folder: str) -> bool:
    """A Trainer checkpoint folder resume can use: committed ckpt data and its trainer_state.json."""
    return os.path.exists(os.path.join(folder, "ckpt", "manifest.json")) and os.path.exists(
        os.path.join(folder, "trainer_state.json")
    )


def test_async_saves_write_what_sync_saves_write(straight, tmp_path):
    """Training goes on while a save persists, yet each checkpoint holds the state of its step: the
    async run's checkpoints equal, bit for bit, a synchronous run's, and so do the two runs' losses."""
    sync = trainer(str(tmp_path / "sync"), model_seed=0, async_save=False)
    sync.train()
    assert all(same_bits(a, b) for a, b in zip(sync.losses, straight.losses))
    for step in (4, 8, 10):
        name = f"checkpoint-{step}"
        assert complete(os.path.join(straight.args.output_dir, name))
        want, got = (read_all(os.path.join(r, name, "ckpt")) for r in (sync.args.output_dir, straight.args.output_dir))
        assert want.keys() == got.keys() and any(k.startswith("optimizer.") for k in want)
        assert all(same_bits(want[k], got[k]) for k in want), step
    assert sorted(os.listdir(straight.args.output_dir)) == ["checkpoint-10", "checkpoint-4", "checkpoint-8"]


def slow_commits(monkeypatch, seconds: float) -> None:
    """Every ckpt commit waits ``seconds`` first: the Trainer's next steps run while a save is in flight."""
    import ckpt.engine

    real = ckpt.engine.commit

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt.engine, "commit", slow)


class Watch(transformers.TrainerCallback):
    """What output_dir shows right after each save was started."""

    def __init__(self) -> None:
        self.seen: dict[int, list[str]] = {}

    def on_save(self, args, state, control, **kwargs):
        self.seen[state.global_step] = sorted(os.listdir(args.output_dir))
        for name in self.seen[state.global_step]:
            assert name == "ckpt-pending" or complete(os.path.join(args.output_dir, name)), name


def test_async_save_racing_rotation_loses_nothing(monkeypatch, tmp_path):
    """save_total_limit=1 with commits slower than training steps: the committed checkpoint stays
    until the next one has committed; a half-written one is never visible as checkpoint-<step>."""
    slow_commits(monkeypatch, 0.5)
    t = trainer(str(tmp_path / "a"), model_seed=0, save_total_limit=1)
    watch = Watch()
    t.add_callback(watch)
    t.train()
    assert watch.seen[4] == ["ckpt-pending"]  # step 4 in flight; nothing claims it yet
    assert watch.seen[8] == ["checkpoint-4", "ckpt-pending"]  # not rotated away for step 8, not committed
    assert sorted(os.listdir(t.args.output_dir)) == ["checkpoint-10"]  # train() waited, published, rotated
    assert ckpt.read(os.path.join(t.args.output_dir, "checkpoint-10", "ckpt"))["scheduler"]["last_epoch"] == 10


KILLED_RUN = """
import os, signal, sys, time
import torch
import transformers
import ckpt.engine
import test_integrations_hf as t

out, mode, threads = sys.argv[1:]
torch.set_num_threads(int(threads))  # the straight run's: CPU kernels reduce in another order with another count
if mode == "uncommitted":  # step 8's save never commits: the process dies with it half-written
    real = ckpt.engine.commit

    def stall(storage, *args, **kwargs):
        if "checkpoint-8" in storage.uri_of(""):
            time.sleep(3600)
        return real(storage, *args, **kwargs)

    ckpt.engine.commit = stall


class KillAtSave(transformers.TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 8:
            if mode == "committed":  # committed, but killed before the Trainer publishes the folder
                run._ckpt_pending.handle.wait()
            os.kill(os.getpid(), signal.SIGKILL)


run = t.trainer(out, model_seed=0)
run.add_callback(KillAtSave())
run.train()
"""


@pytest.mark.dist  # a fresh interpreter, killed
@pytest.mark.parametrize("mode, resumed_at", [("uncommitted", 4), ("committed", 8)])
def test_trainer_sigkilled_mid_async_save_resumes_from_a_committed_checkpoint(straight, tmp_path, mode, resumed_at):
    """SIGKILL right after the step-8 save started: resume_from_checkpoint=True continues from
    step 4 (step 8's save never committed) or from step 8 (it had), bitwise as the straight run."""
    out = str(tmp_path / "a")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = [sys.executable, "-c", KILLED_RUN, out, mode, str(torch.get_num_threads())]
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["checkpoint-4", "ckpt-pending"]  # what get_last_checkpoint sees: step 4
    assert os.listdir(os.path.join(out, "ckpt-pending")) == ["checkpoint-8"]
    again = trainer(out, model_seed=1)
    again.train(resume_from_checkpoint=True)
    same_run(straight, again, start=resumed_at)
    assert "ckpt-pending" not in os.listdir(out)


class Killed(Exception):
    pass


class KillAfter(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed before step {self.step + 1}")


def test_trainer_killed_then_resume_true(straight, tmp_path):
    """A run dies after its save of step 4; resume_from_checkpoint=True finds that ckpt-backed
    checkpoint in output_dir and continues exactly as the uninterrupted run did."""
    out = str(tmp_path / "a")
    first = trainer(out, model_seed=0)
    first.add_callback(KillAfter(4))
    with pytest.raises(Killed):
        first.train()
    assert sorted(os.listdir(out)) == ["checkpoint-4"]
    again = trainer(out, model_seed=1)
    again.train(resume_from_checkpoint=True)
    same_run(straight, again)


def test_trainer_load_best_model_at_end_from_ckpt(tmp_path):
    t = trainer(str(tmp_path / "a"), model_seed=0)
    t.args.eval_strategy = t.args.save_strategy
    t.args.eval_steps, t.args.metric_for_best_model, t.args.load_best_model_at_end = 4, "loss", True
    t.args.greater_is_better = True  # the worst loss "wins": an early checkpoint, not the final weights
    t.eval_dataset = Rows()
    t.train()
    best = t.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-10")
    assert os.path.exists(os.path.join(best, "ckpt", "manifest.json"))
    stored = ckpt.read(os.path.join(best, "ckpt"))["model"]
    assert all(same_bits(v, stored[k]) for k, v in t.model.state_dict().items())


# --- accelerate ---------------------------------------------------------------------------------


class Counter:
    """A custom object registered with accelerate for checkpointing."""

    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self) -> dict[str, int]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seen = state["seen"]


def accelerate_run(steps: int, model_seed: int, save: str | None = None, save_at: int = 0, resume: str | None = None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, set_seed

    AcceleratorState._reset_state(True)
    model = tiny_llama(model_seed)
    set_seed(0)
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    loader = torch.utils.data.DataLoader(Rows(), batch_size=BATCH, shuffle=True, generator=torch.Generator())
    counter = Counter()
    acc.register_for_checkpointing(counter)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    step, losses = 0, []
    if resume:
        step = ckpt_hf.load_state(acc, resume).step
        assert counter.seen == step
    model.train()
    while step < steps:
        epoch, done = divmod(step, len(loader))
        loader.set_epoch(epoch)
        for batch in acc.skip_first_batches(loader, done) if done else loader:
            loss = model(**batch).loss
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.detach().clone())
            step += 1
            counter.seen += 1
            if step == save_at:
                ckpt_hf.save_state(acc, save, step=step, metrics={"loss": loss.item()})
            if step == steps:
                break
    return losses, acc.unwrap_model(model)


def test_accelerate_save_state_load_state_resume_bitwise(tmp_path):
    uri = str(tmp_path / "step-4")
    straight, model = accelerate_run(10, model_seed=0, save=uri, save_at=4)
    resumed, model2 = accelerate_run(10, model_seed=1, resume=uri)
    assert len(straight) == 10 and len(resumed) == 6
    for i, (a, b) in enumerate(zip(straight[4:], resumed)):
        assert same_bits(a, b), f"step {i + 5}: {a.item()} != {b.item()}"
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert same_bits(a, b), name
    # nothing pickled: one ckpt checkpoint holds it all
    assert sorted(os.listdir(uri)) == ["data", "manifest.json"]


# --- under DDP: two ranks, per-rank RNG and data shards -------------------------------------------


def _ddp_trainer_rank(rank: int, world: int, root: str) -> None:
    # what torchrun sets; the process group is already up (tests/dist.py), accelerate adopts it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    straight = trainer(os.path.join(root, "a"), model_seed=0, ddp_backend="gloo")
    straight.train()
    assert straight.args.world_size == world and len(straight.losses) == 10
    resumed = trainer(os.path.join(root, "b"), model_seed=1, ddp_backend="gloo")
    resumed.train(resume_from_checkpoint=os.path.join(root, "a", "checkpoint-4"))
    same_run(straight, resumed)


@pytest.mark.dist
def test_trainer_under_ddp_two_ranks_resumes_bitwise(tmp_path):
    from dist import run_ranks

    run_ranks(_ddp_trainer_rank, 2, str(tmp_path), timeout=900, start_method="forkserver")
    saved = ckpt.read(str(tmp_path / "a" / "checkpoint-4" / "ckpt"))
    assert set(saved["rng"]) == {"0", "1"}  # each rank's own RNG states, all of them
    assert all(set(saved["rng"][r]) >= {"python", "numpy", "cpu"} for r in "01")


def _accelerate_rank(rank: int, world: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    uri = os.path.join(root, "step-2")
    straight, model = accelerate_run(6, model_seed=0, save=uri, save_at=2)
    resumed, model2 = accelerate_run(6, model_seed=1, resume=uri)
    assert len(straight) == 6 and len(resumed) == 4
    assert all(same_bits(a, b) for a, b in zip(straight[2:], resumed)), (straight[2:], resumed)
    assert all(same_bits(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


@pytest.mark.dist
def test_accelerate_two_processes_resume_bitwise(tmp_path):
    from dist import run_ranks

    run_ranks(_accelerate_rank, 2, str(tmp_path), timeout=900, start_method="forkserver")
    saved = ckpt.read(str(tmp_path / "step-2"))
    assert set(saved["rng"]) == {"0", "1"}
