"""Loading the way training code is written: fresh optimizers whose state is still empty,
partial loads that still catch renamed modules, missing/unexpected key lists, mismatch
errors that say why first, and run roots that load what ``latest`` names."""

from __future__ import annotations

import pytest
import torch

import ckpt
from ckpt import CheckpointNotFoundError, StateDictMismatchError

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)


def train(model, opt, steps: range) -> list[float]:
    losses = []
    for i in steps:
        x, y = batch(i)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_into_a_fresh_optimizer_is_bitwise_exact(tmp_path, name):
    model = make_model(0)
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, range(3))
    path = str(tmp_path / "c")
    ckpt.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    want = train(model, opt, range(3, 8))

    model2 = make_model(1)  # other weights; its optimizer has never stepped: state == {}
    opt2 = OPTIMIZERS[name](model2.parameters())
    state = {"model": model2.state_dict(), "optim": opt2.state_dict()}
    assert state["optim"]["state"] == {}
    result = ckpt.load(state, path)  # strict: the empty state is filled, not reported
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert sorted(state["optim"]["state"]) == [0, 1, 2, 3] and result.filled_keys
    opt2.load_state_dict(state["optim"])
    assert train(model2, opt2, range(3, 8)) == want


def test_filled_tensors_go_to_the_targets_device_or_where_fill_says(tmp_path):
    model = make_model(0)
    opt = torch.optim.Adam(model.parameters())
    train(model, opt, range(1))
    path = str(tmp_path / "c")
    ckpt.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    made = []

    def fill(key, shape, dtype):
        made.append(key)
        return torch.full(shape, -1.0, dtype=dtype) if key.endswith("exp_avg") else None

    state = {"model": make_model(1).state_dict(), "optim": {"state": {}, "param_groups": []}}
    ckpt.load(state, path, options=ckpt.LoadOptions(fill=fill))
    assert "optim.state.0.exp_avg" in made and "optim.state.0.step" in made
    assert torch.equal(state["optim"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert state["optim"]["param_groups"] == opt.state_dict()["param_groups"]


def test_partial_load_ignores_extra_checkpoint_keys_but_not_missing_ones(tmp_path):
    model = make_model(0)
    opt = torch.optim.Adam(model.parameters())
    train(model, opt, range(1))
    path = str(tmp_path / "c")
    ckpt.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 1}, path)

    evaluation = {"model": make_model(1).state_dict()}
    result = ckpt.load(evaluation, path, partial=True)
    assert result.missing_keys == [] and "step" in result.unexpected_keys
    assert all(torch.equal(evaluation["model"][k], v) for k, v in model.state_dict().items())

    renamed = {"model": {k.replace("2.", "head."): v for k, v in make_model(1).state_dict().items()}}
    with pytest.raises(StateDictMismatchError) as raised:
        ckpt.load(renamed, path, partial=True)
    err = raised.value
    first, hint = str(err).splitlines()[:2]
    assert first.endswith("the state dict does not match the checkpoint: 2 key(s) missing from the checkpoint")
    assert hint == (
        "hint: 'model.head' in the state dict looks renamed from 'model.2' in the checkpoint (2 keys match after it); "
        "rename the module or remap the keys"
    )
    assert err.missing_keys == ["model.head.bias", "model.head.weight"]

    result = ckpt.load(renamed, path, strict=False)  # loose: loads what matches, reports the rest
    assert result.missing_keys == ["model.head.bias", "model.head.weight"]
    assert "model.2.weight" in result.unexpected_keys and "step" in result.unexpected_keys


def test_strict_mismatch_hints(tmp_path):
    path = str(tmp_path / "c")
    ckpt.save({"w": torch.zeros(2, 3), "extra": torch.zeros(1)}, path)
    with pytest.raises(StateDictMismatchError) as raised:
        ckpt.load({"w": torch.zeros(2, 3)}, path)
    hint = str(raised.value).splitlines()[1]
    assert hint.startswith("hint: the checkpoint holds keys the state dict lacks; partial=True")
    with pytest.raises(StateDictMismatchError) as raised:
        ckpt.load({"w": torch.zeros(3, 3), "extra": torch.zeros(1)}, path)
    assert "hint: shapes differ" in str(raised.value)
    with pytest.raises(StateDictMismatchError) as raised:
        ckpt.load({"w": torch.zeros(2, 3, dtype=torch.float64), "extra": torch.zeros(1)}, path)
    assert "hint: only dtypes differ; pass allow_dtype_cast=True" in str(raised.value)


def test_checkpoint_saved_before_the_first_step_says_so(tmp_path):
    model = make_model(0)
    opt = torch.optim.Adam(model.parameters())
    path = str(tmp_path / "c")
    ckpt.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)  # state == {}
    train(model, opt, range(1))
    with pytest.raises(StateDictMismatchError) as raised:
        ckpt.load({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    assert "hint: the checkpoint's 'optim.state' is empty (saved before the optimizer's first step?)" in str(
        raised.value
    )


def test_load_on_a_run_root_loads_latest_or_lists_what_exists(tmp_path):
    root = str(tmp_path / "run")
    mgr = ckpt.Manager(root, handle_sigterm=False)
    for step in (10, 20):
        mgr.save(step, {"w": torch.full((2,), float(step))})
    mgr.wait()
    target = {"w": torch.zeros(2)}
    result = ckpt.load(target, root)
    assert result.step == 20 and torch.equal(target["w"], torch.full((2,), 20.0))
    assert ckpt.read(root)["w"].tolist() == [20.0, 20.0]
    (tmp_path / "run" / "latest").unlink()
    with pytest.raises(CheckpointNotFoundError, match="holds 2 checkpoint\\(s\\): step-00000010, step-00000020"):
        ckpt.load(target, root)
    mgr.close()
