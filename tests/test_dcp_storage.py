"""``ckpt.dcp.Writer`` / ``Reader``: DCP's save and load APIs on ckpt's own format.

The scenarios follow torch's own file-system storage tests (test/distributed/checkpoint/
test_file_system_checkpoint_cpu.py: tensors only, tensors with a blob-holding Stateful,
dtype casting, sharded tensors saved and reloaded, resharding on load between shard plans)
and its e2e save/load tests (FSDP2 model + optimizer through get_state_dict, async_save),
rewritten here against the ckpt storage pair; what ckpt adds is checked too: what DCP
writes is a ckpt checkpoint (ckpt.load, ckpt.read, `ckpt verify`), what ckpt.save writes
loads through dcp.load, and nothing pickled is stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist import run_ranks
from helpers import assert_bitwise, random_tensor, run_cli, same_bits
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

import ckpt
import ckpt.dcp
from ckpt import CheckpointExistsError, UnsupportedValueError


class Module(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear_1 = torch.nn.Linear(5, 5)
        self.linear_2 = torch.nn.Linear(5, 1)
        self.emb = torch.nn.EmbeddingBag(5, 10)


class Blob(Stateful):
    """A Stateful whose state holds bytes (DCP would pickle them)."""

    def __init__(self, value: bytes) -> None:
        self.state = {"blob": value}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state_dict: dict) -> None:
        self.state = state_dict


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert_bitwise(a[k], b[k], k)


def test_tensors_only_round_trip(tmp_path):
    saved = Module().state_dict()
    dcp.save(saved, storage_writer=ckpt.dcp.Writer(tmp_path / "c"))
    target = Module().state_dict()
    dcp.load(target, storage_reader=ckpt.dcp.Reader(tmp_path / "c"))
    _assert_same(target, saved)


def test_checkpoint_id_selects_the_location(tmp_path):
    saved = Module().state_dict()
    dcp.save(saved, checkpoint_id=tmp_path / "c", storage_writer=ckpt.dcp.Writer())
    target = Module().state_dict()
    dcp.load(target, checkpoint_id=tmp_path / "c", storage_reader=ckpt.dcp.Reader())
    _assert_same(target, saved)


def test_tensors_and_a_stateful_blob(tmp_path):
    saved = {**Module().state_dict(), "test_blob": Blob(b"SomeBlobForTesting")}
    dcp.save(saved, storage_writer=ckpt.dcp.Writer(tmp_path / "c"))
    target = {**Module().state_dict(), "test_blob": Blob(b"")}
    dcp.load(target, storage_reader=ckpt.dcp.Reader(tmp_path / "c"))
    assert target["test_blob"].state == {"blob": b"SomeBlobForTesting"}
    del target["test_blob"], saved["test_blob"]
    _assert_same(target, saved)


def test_dtype_cast_on_load(tmp_path):
    w = torch.rand(4, 3)
    dcp.save({"w": w}, storage_writer=ckpt.dcp.Writer(tmp_path / "c"))
    target = {"w": torch.zeros(4, 3, dtype=torch.bfloat16)}
    dcp.load(target, storage_reader=ckpt.dcp.Reader(tmp_path / "c"))
    assert torch.equal(target["w"], w.to(torch.bfloat16))


def test_what_dcp_writes_is_a_ckpt_checkpoint(tmp_path):
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 7, "lrs": (0.1, 0.2), "path": Path("/x")}
    dcp.save(state, storage_writer=ckpt.dcp.Writer(tmp_path / "c"))

    got = ckpt.read(str(tmp_path / "c"))
    assert_bitwise(got["model"]["weight"], model.weight.detach())
    # DCP flattens nested keys before they reach storage: the saved nesting is inferred from them
    assert_bitwise(got["optim"]["state"][0]["exp_avg"], opt.state[model.weight]["exp_avg"])
    assert got["step"] == 7 and got["lrs"] == (0.1, 0.2) and got["path"] == Path("/x")

    target = {"model": torch.nn.Linear(8, 4).state_dict()}
    ckpt.load(target, str(tmp_path / "c"), strict=False)
    assert_bitwise(target["model"]["weight"], model.weight.detach())

    code, out, err = run_cli("verify", str(tmp_path / "c"))
    assert code == 0, out + err
    # No pickle anywhere in what was stored: the format is JSON + safetensors framing only.
    for root, _, files in os.walk(tmp_path / "c"):
        for name in files:
            assert not (Path(root) / name).read_bytes().startswith(b"\x80"), name


def test_what_ckpt_saves_loads_through_dcp(tmp_path):
    model = Module()
    rng = torch.get_rng_state()
    ckpt.save({"model": model.state_dict(), "step": 9, "rng": rng}, str(tmp_path / "c"))
    target = {"model": Module().state_dict(), "step": 0, "rng": torch.zeros_like(torch.get_rng_state())}
    dcp.load(target, storage_reader=ckpt.dcp.Reader(tmp_path / "c"))
    _assert_same(target["model"], model.state_dict())
    assert target["step"] == 9
    assert torch.equal(target["rng"], rng)


def test_a_value_without_a_typed_form_is_refused_naming_its_key(tmp_path):
    class Opaque:
        pass

    with pytest.raises(CheckpointException, match=UnsupportedValueError.__name__) as e:
        dcp.save({"w": torch.ones(2), "thing": Opaque()}, storage_writer=ckpt.dcp.Writer(tmp_path / "c"))
    assert "thing: " in str(e.value) and "cannot be saved without pickle" in str(e.value)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_an_existing_checkpoint_is_not_replaced_unless_asked(tmp_path):
    dcp.save({"w": torch.ones(2)}, storage_writer=ckpt.dcp.Writer(tmp_path / "c"))
    # DCP wraps what a storage writer raises in its own CheckpointException, naming the cause
    with pytest.raises(CheckpointException, match=CheckpointExistsError.__name__):
        dcp.save({"w": torch.zeros(2)}, storage_writer=ckpt.dcp.Writer(tmp_path / "c"))
    dcp.save(
        {"w": torch.zeros(2)},
        storage_writer=ckpt.dcp.Writer(tmp_path / "c", ckpt.SaveOptions(overwrite=True)),
    )
    target = {"w": torch.ones(2)}
    dcp.load(target, storage_reader=ckpt.dcp.Reader(tmp_path / "c"))
    assert torch.equal(target["w"], torch.zeros(2))


def test_async_save_commits_a_ckpt_checkpoint(tmp_path):
    saved = {"w": random_tensor((64, 32), torch.float32, 1), "step": 3}
    future = dcp.async_save(saved, storage_writer=ckpt.dcp.Writer(tmp_path / "c"))
    future.result()
    target = {"w": torch.zeros(64, 32), "step": 0}
    ckpt.load(target, str(tmp_path / "c"))
    assert_bitwise(target["w"], saved["w"])
    assert target["step"] == 3


# -- several ranks: DTensor shards through DCP, resharded on load ---------------------------------------


def _full(seed: int) -> torch.Tensor:
    return random_tensor((10, 20), torch.float32, seed)


def _save_shards_then_reload(rank: int, world: int, uri: str) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    plans = [[Shard(0)], [Shard(1)], [Replicate()]]
    for i, save_plan in enumerate(plans):
        for j, load_plan in enumerate(plans):
            where = f"{uri}/{i}-{j}"
            saved = {"t": distribute_tensor(_full(i), mesh, save_plan), "n": i}
            dcp.save(saved, storage_writer=ckpt.dcp.Writer(where))
            target = {"t": distribute_tensor(torch.zeros(10, 20), mesh, load_plan), "n": -1}
            dcp.load(target, storage_reader=ckpt.dcp.Reader(where))
            assert same_bits(target["t"].full_tensor(), _full(i)), (save_plan, load_plan)
            assert target["n"] == i
    dist.barrier()


@pytest.mark.dist
def test_dtensors_saved_through_dcp_reload_under_every_other_placement(tmp_path):
    run_ranks(_save_shards_then_reload, 2, str(tmp_path), start_method="forkserver")
    # ... and what DCP wrote on 2 ranks loads in one process with ckpt.load, as the global tensor.
    target = {"t": torch.zeros(10, 20), "n": -1}
    ckpt.load(target, str(tmp_path / "0-1"))
    assert same_bits(target["t"], _full(0)) and target["n"] == 0


def _fsdp_train_save(rank: int, world: int, uri: str) -> list[float]:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(model, opt, i):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(8, 16, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    model, opt = build()
    for i in range(3):
        step(model, opt, i)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=ckpt.dcp.Writer(uri))
    reference = [step(model, opt, i) for i in range(3, 6)]

    model2, opt2 = build()
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, storage_reader=ckpt.dcp.Reader(uri))
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed = [step(model2, opt2, i) for i in range(3, 6)]
    assert resumed == reference, (resumed, reference)
    return resumed


@pytest.mark.dist
def test_fsdp2_model_and_optimizer_resume_bitwise_through_dcp(tmp_path):
    losses = run_ranks(_fsdp_train_save, 2, str(tmp_path / "c"), start_method="forkserver")
    assert losses[0] == losses[1]
