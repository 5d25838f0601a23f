"""Weight rules of ckpt.merge: pure functions, no checkpoints needed."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.merge import EMA, MWA, Explicit, MergeSourceInfo, Method, Uniform, WeightError, mwa_weights, register_method
from ckpt.merge.methods import check_weights, ema_weights, make_method, method_names

metrics = st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=20)
penalties = st.floats(0.0, 50.0, allow_nan=False)
# Metrics on a 1e-3 grid: distinct values stay distinct under the affine maps below (a spread
# of 1e-212 next to a shift of 1.0 is rounded away by float64 itself, not by MWA).
coarse_metrics = st.lists(st.integers(-(10**9), 10**9).map(lambda i: i / 1000), min_size=1, max_size=20)


def series(n: int, steps=None, metrics=None) -> list[MergeSourceInfo]:
    return [
        MergeSourceInfo(i, f"mem://c{i}", None if steps is None else steps[i], {} if metrics is None else metrics[i])
        for i in range(n)
    ]


@settings(max_examples=150, deadline=None)
@given(metrics, penalties)
def test_mwa_sums_to_one_and_never_favours_a_worse_metric(values, pf):
    w = mwa_weights(values, pf)
    assert math.isclose(math.fsum(w), 1.0, rel_tol=1e-12)
    assert all(x >= 0 for x in w)
    for i in range(len(values)):
        for j in range(len(values)):
            if values[i] < values[j]:  # i is better (lower)
                assert w[i] >= w[j]
            if values[i] == values[j]:
                assert w[i] == w[j]


@settings(max_examples=100, deadline=None)
@given(metrics)
def test_mwa_penalty_zero_is_uniform(values):
    assert mwa_weights(values, 0.0) == pytest.approx([1 / len(values)] * len(values), rel=1e-12)


@settings(max_examples=100, deadline=None)
@given(metrics, penalties, penalties)
def test_mwa_larger_penalty_moves_weight_to_the_best(values, a, b):
    lo, hi = min(a, b), max(a, b)
    best = min(values)
    share = [sum(w for w, v in zip(mwa_weights(values, pf), values) if v == best) for pf in (lo, hi)]
    assert share[1] >= share[0] - 1e-12


@settings(max_examples=100, deadline=None)
@given(metrics.filter(lambda v: len(set(v)) > 1))
def test_mwa_large_penalty_concentrates_on_the_best(values):
    best, worst = min(values), max(values)
    n_best = values.count(best)
    gap = min(v for v in values if v != best) - best  # the runner-up's distance, relative to the spread:
    z = gap / (worst - best)
    w = mwa_weights(values, 1e4)
    assert sum(wi for wi, v in zip(w, values) if v == best) >= 1 - len(values) * math.exp(-1e4 * z) - 1e-12
    exact = mwa_weights(values, math.inf)
    assert exact == [1 / n_best if v == best else 0.0 for v in values]


@settings(max_examples=100, deadline=None)
@given(coarse_metrics, penalties, st.floats(0.01, 100), st.floats(-100, 100))
def test_mwa_ignores_the_metric_unit_and_higher_is_better_mirrors(values, pf, scale, shift):
    w = mwa_weights(values, pf)
    assert mwa_weights([v * scale + shift for v in values], pf) == pytest.approx(w, abs=1e-9)
    assert mwa_weights([-v for v in values], pf, higher_is_better=True) == pytest.approx(w, abs=1e-12)


def test_mwa_best_over_worst_is_e_to_the_penalty():
    w = mwa_weights([2.0, 3.5, 5.0], 1.5)
    assert w[0] / w[2] == pytest.approx(math.exp(1.5))
    assert w[1] / w[2] == pytest.approx(math.exp(0.75))


def test_mwa_by_metric_and_by_step():
    s = series(3, steps=[100, 200, 300], metrics=[{"loss": 1.0}, {"loss": 0.5}, {"loss": 0.9}])
    w = MWA("loss", 2.0).weights(s)
    assert max(range(3), key=lambda i: w[i]) == 1
    by_step = MWA(penalty=2.0).weights(s)
    assert by_step[0] < by_step[1] < by_step[2]  # later is better by default
    acc = series(2, metrics=[{"acc": 0.7}, {"acc": 0.9}])
    assert MWA("acc", 1.0, higher_is_better=True).weights(acc)[1] > 0.5


def test_mwa_errors_name_the_source_and_metric():
    s = series(2, metrics=[{"loss": 1.0}, {"acc": 0.3}])
    with pytest.raises(WeightError, match=r"mem://c1 records no metric 'loss' \(it has: acc\)"):
        MWA("loss").weights(s)
    with pytest.raises(WeightError, match="mem://c0 records no step"):
        MWA().weights(series(2))
    with pytest.raises(WeightError, match="not a finite number"):
        MWA("loss").weights(series(2, metrics=[{"loss": 1.0}, {"loss": float("nan")}]))
    with pytest.raises(WeightError, match="penalty factor must be >= 0"):
        mwa_weights([1.0, 2.0], -0.5)


def test_ema_weights_match_the_recursion():
    xs = [3.0, -1.0, 4.0, 1.5, 9.0]
    for decay in (0.0, 0.3, 0.9, 0.999):
        e = xs[0]
        for x in xs[1:]:
            e = decay * e + (1 - decay) * x
        w = ema_weights(len(xs), decay)
        assert math.fsum(wi * x for wi, x in zip(w, xs)) == pytest.approx(e, rel=1e-12)
        assert math.fsum(w) == pytest.approx(1.0, rel=1e-12)
    assert EMA(0.0).weights(series(3)) == [0.0, 0.0, 1.0]
    with pytest.raises(WeightError, match=r"decay must be in \[0, 1\)"):
        EMA(1.0).weights(series(3))


def test_explicit_weights_follow_the_callers_order_and_are_checked():
    s = series(3, steps=[30, 10, 20])
    ordered = sorted(s, key=lambda x: x.step)  # the series order the driver passes
    assert Explicit([0.5, 0.2, 0.3]).weights(ordered) == [0.2, 0.3, 0.5]
    with pytest.raises(WeightError, match="2 weights for 3 sources"):
        Explicit([0.5, 0.5]).weights(s)
    with pytest.raises(WeightError, match=r"sum to 1\.2.*not 1; pass normalize=True"):
        Explicit([0.5, 0.5, 0.2]).weights(s)
    with pytest.raises(WeightError, match=r"negative weight\(s\) at position\(s\) \[1\]"):
        Explicit([1.5, -0.7, 0.2]).weights(s)
    assert Explicit([1.5, -0.7, 0.2], allow_negative=True).weights(s) == pytest.approx([1.5, -0.7, 0.2])
    assert Explicit([2, 1, 1], normalize=True).weights(s) == pytest.approx([0.5, 0.25, 0.25])
    assert Explicit([1, 1, 1], require_sum_one=False).weights(s) == [1, 1, 1]
    with pytest.raises(WeightError, match="non-finite"):
        Explicit([float("nan"), 0.5, 0.5]).weights(s)


def test_registry_makes_methods_pluggable():
    @register_method
    class LastOnly(Method):
        name = "test-last-only"

        def weights(self, series):
            return [0.0] * (len(series) - 1) + [1.0]

    assert "test-last-only" in method_names()
    assert make_method("test-last-only").weights(series(3)) == [0.0, 0.0, 1.0]
    assert isinstance(make_method("uniform"), Uniform)
    with pytest.raises(ValueError, match="unknown merge method 'soup'; known: .*uniform"):
        make_method("soup")
    with pytest.raises(TypeError, match="merge method 'ema'"):
        make_method("ema", decayy=0.5)
    with pytest.raises(WeightError, match="3 weights for 2 sources"):
        check_weights([1, 2, 3], 2, "x")


def test_task_arithmetic_adds_scaled_task_vectors_to_the_base():
    from ckpt.merge.methods import TaskArithmetic

    s = series(3, steps=[5, 1, 3])  # given order: base (pretrained) first, then two fine-tunes
    ordered = sorted(s, key=lambda x: x.step)
    w = dict(zip((x.position for x in ordered), TaskArithmetic(pretrained=0, scale=0.3).weights(ordered)))
    thetas = {0: 10.0, 1: 12.0, 2: 7.0}
    expected = 10.0 + 0.3 * ((12.0 - 10.0) + (7.0 - 10.0))
    assert math.fsum(w[i] * thetas[i] for i in thetas) == pytest.approx(expected)
    assert math.fsum(w.values()) == pytest.approx(1.0)
    with pytest.raises(WeightError, match="pretrained=5, but there are 3 sources"):
        TaskArithmetic(pretrained=5).weights(s)
