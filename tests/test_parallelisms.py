"""The layout matrix of real parallelisms: save under each, resume under each, on CPU gloo ranks.

The same small llama-like model with an MoE layer (``parallel_train``) is trained
``K`` steps with AdamW under each layout (FSDP2 over TP the torchtitan way, HSDP,
pipeline stages with FSDP, expert parallel, Megatron TP + distributed optimizer
through ``ckpt.Sharded``, and plain tensors on one rank), its model and optimizer
state saved with ``ckpt.save``, and the run continued ``M`` steps: the
uninterrupted reference. Every checkpoint is then loaded under every layout (a
model built from another seed, so the load must replace every weight): the loss on
a probe batch right after loading and the ``M`` continued losses must match the
source's reference.

* Same layout: bit for bit (the reduction order is unchanged).
* Another layout: within a relative ``LOSS_RTOL`` of 5e-6. The state loaded is the
  saved state exactly, but each layout sums in its own order (TP splits the GEMMs,
  DP averages over 1, 2 or 4 ranks, EP sums experts across ranks), so fp32 results
  move by an ulp or so: the six layouts' own reference runs agree to ~1e-7
  relative (asserted below at 1e-6), and the worst resumed pair observed differs by
  1.4e-7 (35x headroom). A resume that keeps the model but loses the optimizer
  state is off by 9e-4 by the third step, more than 100x the tolerance (asserted),
  so the tolerance still tells a correct resume from a broken one.

All layouts run in one forked 4-rank job (plus two 1-rank jobs for the plain
layout), so the whole matrix costs three process groups, not one per pair.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from parallel_train import LAYOUTS, WORLD
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Shard

import ckpt
from ckpt.describe import walk
from ckpt.errors import UnsupportedValueError

K, M = 2, 3  # steps before the save, steps after it
SLOW_K, SLOW_M = 4, 8
LOSS_RTOL = 5e-6
FOUR = tuple(n for n in LAYOUTS if WORLD[n] == 4)
ALL = tuple(LAYOUTS)

pytestmark = pytest.mark.dist


def train_and_save(name: str, root: str, k: int, m: int) -> dict:
    t = LAYOUTS[name](seed=0)
    losses = [t.train_step(s) for s in range(k)]
    probe = t.probe_loss()
    ckpt.save(t.state(), f"{root}/{name}", step=k)
    losses += [t.train_step(s) for s in range(k, k + m)]
    return {"losses": losses, "probe": probe}


def resume(name: str, root: str, source: str, k: int, m: int, fresh_optimizer: bool = False) -> dict:
    t = LAYOUTS[name](seed=1)  # other weights: the load must replace every one
    state = t.state()
    if fresh_optimizer:  # the control: the model alone
        state = {"model": state["model"]}
    # A pipeline stage holds some of the keys; it checks it got every one of its own.
    partial = name == "pp_fsdp" or fresh_optimizer
    manifest = ckpt.load(state, f"{root}/{source}", strict=not partial)
    missing = {key for key, _, _ in walk(state)} - set(manifest.tensors)
    assert not missing, f"{name} <- {source}: {sorted(missing)} not in the checkpoint"
    if fresh_optimizer:
        t.model.load_state_dict(state["model"])
    else:
        t.restore(state)
    probe = t.probe_loss()
    return {"probe": probe, "losses": [t.train_step(s) for s in range(k, k + m)]}


def partial_refusal(root: str) -> str:
    """What saving an unreduced (``Partial``) DTensor raises on this rank."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    grad = DTensor.from_local(torch.ones(3), mesh, [Shard(0), Partial()])
    try:
        ckpt.save({"model": {"w": grad}}, f"{root}/partial")
    except UnsupportedValueError as e:
        return str(e)
    return "saved"


def matrix_job(rank: int, world: int, root: str, saves, loads, k: int, m: int, control: bool) -> dict:
    out = {"ref": {n: train_and_save(n, root, k, m) for n in saves}, "resumed": {}}
    if world == 4:
        out["partial"] = partial_refusal(root)
    dist.barrier()  # every checkpoint is committed before any rank loads one
    for source, target in loads:
        out["resumed"][source, target] = resume(target, root, source, k, m)
    if control:
        out["control"] = resume("plain", root, "plain", k, m, fresh_optimizer=True)
    return out


def run_matrix(root: str, k: int, m: int) -> dict:
    """Plain saves on 1 rank; the 4-rank layouts save, then load every checkpoint; plain loads them all."""
    first = run_ranks(matrix_job, 1, root, ["plain"], [], k, m, False, start_method="forkserver", timeout=300)[0]
    loads = [(s, t) for t in FOUR for s in ALL]
    four = run_ranks(matrix_job, 4, root, list(FOUR), loads, k, m, False, start_method="forkserver", timeout=900)
    for r in four[1:]:
        assert r == four[0], "ranks report different losses"
    last = run_ranks(matrix_job, 1, root, [], [(s, "plain") for s in ALL], k, m, True, start_method="forkserver")[0]
    return {
        "partial": four[0]["partial"],
        "ref": {**first["ref"], **four[0]["ref"]},
        "resumed": {**four[0]["resumed"], **last["resumed"]},
        "control": last["control"],
    }


def close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)


def check_pair(result: dict, source: str, target: str, k: int) -> None:
    ref, got = result["ref"][source], result["resumed"][source, target]
    want = [ref["probe"], *ref["losses"][k:]]
    have = [got["probe"], *got["losses"]]
    if source == target:
        assert have == want, f"{source} -> {target}: not bitwise equal"
    else:
        bad = [(i, a, b) for i, (a, b) in enumerate(zip(have, want)) if not close(a, b, LOSS_RTOL)]
        assert not bad, f"{source} -> {target}: (index, resumed, reference) beyond rtol {LOSS_RTOL}: {bad}"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    return run_matrix(str(tmp_path_factory.mktemp("layouts")), K, M)


def test_every_layout_trains_the_same_model(matrix) -> None:
    """The layouts are the same computation: their uninterrupted runs agree to float rounding."""
    plain = matrix["ref"]["plain"]
    for name, ref in matrix["ref"].items():
        for a, b in zip([ref["probe"], *ref["losses"]], [plain["probe"], *plain["losses"]]):
            assert close(a, b, 1e-6), f"{name}: {ref} vs plain {plain}"


@pytest.mark.parametrize("source,target", list(itertools.product(ALL, ALL)))
def test_save_under_one_layout_resume_under_another(matrix, source: str, target: str) -> None:
    check_pair(matrix, source, target, K)


def test_losing_the_optimizer_state_is_caught(matrix) -> None:
    """The tolerance is tight enough to see a resume that drops the AdamW state."""
    want = matrix["ref"]["plain"]["losses"][K:]
    worst = max(abs(a - b) / abs(b) for a, b in zip(matrix["control"]["losses"], want))
    assert worst > 100 * LOSS_RTOL, worst


def test_a_partial_dtensor_is_refused_naming_key_and_placement(matrix) -> None:
    msg = matrix["partial"]
    assert "model.w" in msg and "Partial(sum)" in msg and "mesh dim 1" in msg, msg


@pytest.mark.slow
def test_layout_matrix_over_a_longer_run(tmp_path) -> None:
    result = run_matrix(str(tmp_path), SLOW_K, SLOW_M)
    for source, target in itertools.product(ALL, ALL):
        check_pair(result, source, target, SLOW_K)
