"""LCSC on a real (small) training run: an MLP on scikit-learn's digits with noisy labels.

Late checkpoints overfit the noise, so the checkpoints differ in quality and the
search has something to find. The search metric is the loss on a clean
validation split; the checkpoints record it at save time as ``metrics={"loss": ...}``.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import read_all
from torch import nn

import ckpt
from ckpt.merge import EvaluationError, MergeError
from ckpt.reader import CheckpointReader

pytestmark = pytest.mark.slow


@functools.cache
def data() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    train_y = y[:900].clone()
    noisy = torch.rand(900, generator=g) < 0.4  # 40% of the training labels are wrong-ish
    train_y[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=g)
    return {"xtr": x[:900], "ytr": train_y, "xval": x[900:1300], "yval": y[900:1300], "xte": x[1300:], "yte": y[1300:]}


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _loss(state: dict[str, torch.Tensor], split: str) -> float:
    m = net()
    m.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    with torch.no_grad():
        return F.cross_entropy(m(data()["x" + split]), data()["y" + split]).item()


def val_loss(state: dict[str, torch.Tensor]) -> float:
    """The search metric (importable as ``test_merge_lcsc:val_loss``)."""
    return _loss(state, "val")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> list[str]:
    """Train with Adam on noisy labels and save 12 checkpoints with their validation loss."""
    torch.manual_seed(0)
    d = data()
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    root = tmp_path_factory.mktemp("digits")
    paths = []
    g = torch.Generator().manual_seed(1)
    for step in range(1, 1201):
        idx = torch.randint(0, 900, (64,), generator=g)
        loss = F.cross_entropy(model(d["xtr"][idx]), d["ytr"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            sd = {"model": model.state_dict(), "step": torch.tensor(step), "note": f"step {step}"}
            with torch.no_grad():
                vl = F.cross_entropy(model(d["xval"]), d["yval"]).item()
            path = str(root / f"step-{step:05d}")
            ckpt.save(sd, path, step=step, metrics={"loss": vl})
            paths.append(path)
    return paths


def test_the_run_overfits(run):
    losses = [CheckpointReader(p).manifest.metrics["loss"] for p in run]
    assert len(run) >= 10
    assert losses[-1] > min(losses) + 0.05, losses  # label noise: late checkpoints get worse on clean data


def test_lcsc_beats_every_recipe_it_starts_from_and_writes_what_it_evaluated(run, tmp_path):
    out = str(tmp_path / "lcsc")
    r = ckpt.merge(run, out, "lcsc", evaluate="test_merge_lcsc:val_loss", budget=80, seed=0, metric="loss")
    search = r.record["search"]
    fitness = search["fitness"]
    # independently: every single checkpoint and the uniform average
    singles = [val_loss(read_all(p)) for p in run]
    ckpt.merge(run, str(tmp_path / "uniform"))
    uniform = val_loss(read_all(str(tmp_path / "uniform")))
    assert fitness <= min(singles)
    assert fitness <= uniform
    assert fitness <= min(search["baselines"].values())
    assert search["evaluations"] == 80 and len(search["trace"]) == 80
    assert search["trace"] == sorted(search["trace"], reverse=True)  # best-so-far never gets worse
    # the written checkpoint is exactly the candidate that scored `fitness`
    written = read_all(out)
    assert val_loss(written) == fitness
    coeffs = [c["coefficient"] for c in search["coefficients"]]
    assert math.fsum(coeffs) == pytest.approx(1.0, abs=1e-9)
    assert list(r.weights.values()) == pytest.approx(coeffs)  # sources were given in step order
    manifest = CheckpointReader(out).manifest
    assert manifest.metadata["merge"]["search"]["fitness"] == fitness
    assert manifest.step == 1200 and torch.equal(written["step"], torch.tensor(1200))
    print(
        f"\nval loss: best single {min(singles):.4f} (last {singles[-1]:.4f}), uniform {uniform:.4f}, "
        f"lcsc {fitness:.4f}; test loss: lcsc {_loss(written, 'te'):.4f}, "
        f"best-val single {_loss(read_all(run[singles.index(min(singles))]), 'te'):.4f}"
    )


def test_lcsc_is_deterministic_and_streaming_matches_cached(run, tmp_path):
    def search(name: str, **kw) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
        out = str(tmp_path / name)
        r = ckpt.merge(run[-6:], out, "lcsc", evaluate=val_loss, budget=24, seed=7, work_bytes=4096, **kw)
        return list(r.weights.values()), r.record["search"]["trace"], read_all(out)

    a, b = search("a"), search("b")
    streamed = search("streamed", cache_bytes=0)  # every candidate re-reads the sources in ranges
    assert a[:2] == b[:2] == streamed[:2]
    for k in a[2]:
        assert torch.equal(a[2][k], streamed[2][k])


def test_evaluation_errors_name_the_candidate(run, tmp_path):
    calls = []

    def flaky(state):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("eval crashed")
        return val_loss(state)

    with pytest.raises(EvaluationError, match=r"candidate mwa:loss:pf=4 \(coefficients \[.*\]\).*eval crashed"):
        ckpt.merge(run[:4], str(tmp_path / "a"), "lcsc", evaluate=flaky, budget=20, metric="loss")
    with pytest.raises(EvaluationError, match=r"candidate uniform .* returned nan, not finite"):
        ckpt.merge(run[:4], str(tmp_path / "b"), "lcsc", evaluate=lambda s: float("nan"), budget=20)
    with pytest.raises(EvaluationError, match="returned 'bad', not a number"):
        ckpt.merge(run[:4], str(tmp_path / "c"), "lcsc", evaluate=lambda s: "bad", budget=20)
    with pytest.raises(MergeError, match=r"budget 3 is smaller than its starting population \(8: uniform"):
        ckpt.merge(run[:4], str(tmp_path / "d"), "lcsc", evaluate=val_loss, budget=3)
    with pytest.raises(MergeError, match="cannot import 'no_such_module_xyz'"):
        ckpt.merge(run[:4], str(tmp_path / "e"), "lcsc", evaluate="no_such_module_xyz:f")
    with pytest.raises(MergeError, match="has no 'nope'"):
        ckpt.merge(run[:4], str(tmp_path / "f"), "lcsc", evaluate="test_merge_lcsc:nope")
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_mwa_on_the_run_favours_the_best_validation_loss(run, tmp_path):
    r = ckpt.merge(run, str(tmp_path / "mwa"), "mwa", metric="loss", penalty=4.0)
    losses = {p: CheckpointReader(p).manifest.metrics["loss"] for p in run}
    best = min(losses, key=losses.get)
    assert max(r.weights, key=r.weights.get) == best
    assert r.weights[best] / min(r.weights.values()) == pytest.approx(math.exp(4.0))


def test_cli_lcsc(run, tmp_path, capsys):
    import argparse

    from ckpt.cli.merge import register

    parser = argparse.ArgumentParser(prog="ckpt")
    register(parser.add_subparsers())
    out = str(tmp_path / "cli")
    argv = ["merge", *run[-5:], "-o", out, "--method", "lcsc", "--eval", "test_merge_lcsc:val_loss"]
    args = parser.parse_args([*argv, "--budget", "20", "--metric", "loss", "--seed", "3", "--no-progress"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    rec = CheckpointReader(out).manifest.metadata["merge"]["search"]
    assert f"fitness {rec['fitness']:.6g} after 20 evaluations" in printed
    assert rec["seed"] == 3 and rec["evaluate"] == "test_merge_lcsc:val_loss"
    assert val_loss(read_all(out)) == rec["fitness"]
