"""The save/load benchmark checks every load bitwise against data it regenerates per region;
these tests pin that generator (any region of a tensor equals that slice of the whole) and the
report helpers, without spawning ranks."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

from bench_save_load import ModelShape, content, state_bytes, tensor_specs  # noqa: E402
from common import format_table, median, rate  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,offsets,sizes",
    [
        ((37, 23), (5, 7), (20, 9)),
        ((37, 23), (0, 0), (37, 23)),
        ((101,), (33,), (50,)),
        ((4, 6, 5), (1, 2, 3), (3, 4, 2)),
    ],
)
def test_content_of_a_region_is_that_slice_of_the_whole(dtype, shape, offsets, sizes):
    whole = content("optim.state.layers.0.attn.q.weight.exp_avg", shape, (0,) * len(shape), shape, dtype)
    part = content("optim.state.layers.0.attn.q.weight.exp_avg", shape, offsets, sizes, dtype)
    want = whole[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
    assert part.dtype == dtype and tuple(part.shape) == sizes
    assert torch.equal(part.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))


def test_content_is_finite_varied_and_differs_between_keys():
    a = content("model.embed.weight", (300, 64), (0, 0), (300, 64), torch.float32)
    b = content("model.lm_head.weight", (300, 64), (0, 0), (300, 64), torch.float32)
    assert torch.isfinite(a).all() and a.abs().min() >= 2**-7 and a.abs().max() < 2
    assert a.unique().numel() > 0.9 * a.numel()
    assert not torch.equal(a, b)


@pytest.mark.parametrize("gib", [0.05, 0.25, 1.0])
def test_model_shape_hits_the_requested_size(gib):
    shape = ModelShape.for_gib(gib)
    got = state_bytes(shape) / 2**30
    assert abs(got - gib) / gib < 0.15, (shape, got)
    keys = [k for k, _, _ in tensor_specs(shape)]
    assert len(keys) == len(set(keys))
    # weights in bf16, optimizer state in fp32, one 0-dim step per parameter
    dtypes = {k: dt for k, _, dt in tensor_specs(shape)}
    assert dtypes["model.embed.weight"] == torch.bfloat16
    assert dtypes["optim.state.embed.weight.exp_avg_sq"] == torch.float32
    assert dict((k, s) for k, s, _ in tensor_specs(shape))["optim.state.norm.weight.step"] == ()


def test_report_helpers():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert rate(2**30, 2.0) == 0.5 and rate(1, 0.0) == float("inf")
    table = format_table(["op", "s"], [["save", 1.23456], ["reshard", 12.5]]).splitlines()
    assert table[0].split() == ["op", "s"] and table[2].split() == ["save", "1.235"]
    assert len({len(line) for line in table}) == 1  # aligned columns
