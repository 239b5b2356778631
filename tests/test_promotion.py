"""The promotion gate's paired test, checked against hand computations and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tao_core.errors import TaoInputError
from tao_core.promotion import EXACT_MAX, decide, paired_test


def rows(values, prefix="q"):
    return [{"prompt_id": f"{prefix}{i}", "value": v} for i, v in enumerate(values)]


def test_binary_metric_is_the_exact_one_sided_mcnemar_test():
    # 10 items: 3 right before and wrong after, 1 the other way, 6 unchanged
    old = [1, 1, 1, 0, 1, 1, 0, 0, 1, 0]
    new = [0, 0, 0, 1, 1, 1, 0, 0, 1, 0]
    t = paired_test(old, new)
    assert (t.wins, t.losses, t.method) == (1, 3, "exact-mcnemar")
    assert t.p_worse == pytest.approx((math.comb(4, 3) + math.comb(4, 4)) / 16)  # P(Bin(4, .5) >= 3) = 5/16
    assert t.diff == pytest.approx(-0.2)


def test_no_difference_and_improvement():
    assert paired_test([1, 0, 1], [1, 0, 1]).p_worse == 1.0
    better = paired_test([0] * 20, [1] * 20)
    assert better.p_worse == 1.0 and better.wins == 20  # P(Bin(20, .5) >= 0)


def test_continuous_values_match_brute_force_enumeration():
    rng = np.random.default_rng(3)
    old, new = rng.random(9), rng.random(9)
    d = new - old
    flips = [sum(s * abs(x) for s, x in zip(signs, d, strict=True)) for signs in itertools.product((-1, 1), repeat=9)]
    want = sum(f <= d.sum() + 1e-12 for f in flips) / len(flips)
    t = paired_test(old, new)
    assert t.method == "exact-sign-flip" and t.p_worse == pytest.approx(want)


def test_many_continuous_differences_use_a_seeded_monte_carlo_estimate():
    rng = np.random.default_rng(4)
    old = rng.random(EXACT_MAX + 30)
    new = old - 0.05 + rng.normal(0, 0.02, size=old.shape)  # worse on almost every item
    t = paired_test(old, new)
    assert t.method == "monte-carlo-sign-flip" and t.p_worse < 1e-3
    assert paired_test(old, new).p_worse == t.p_worse  # reproducible


def test_a_regression_the_intervals_would_miss_is_caught():
    """Worse on 12 items, better on none, of 128: Wilson intervals overlap, the paired test does not."""
    old = [1] * 60 + [0] * 68
    new = [0] * 12 + [1] * 48 + [0] * 68
    d = decide({"arithmetic": rows(old)}, {"arithmetic": rows(new)})
    assert not d.promoted and "arithmetic regressed" in d.reason
    assert d.verdicts[0].test.p_worse == pytest.approx(0.5**12)


def test_no_task_may_regress_and_tolerance_forgives_small_drops():
    old = {"a": rows([1] * 10 + [0] * 10), "b": rows([0] * 20)}
    new = {"a": rows([1] * 10 + [0] * 10), "b": rows([1] * 5 + [0] * 15)}
    assert decide(old, new).promoted  # b improved, a unchanged
    worse = {"a": rows([0] * 6 + [1] * 4 + [0] * 10), "b": rows([1] * 20)}
    d = decide(old, worse)
    assert not d.promoted and [v.task for v in d.verdicts if v.regressed] == ["a"]
    assert decide(old, worse, tolerance=0.5).promoted  # a drop of 0.3 is within the tolerance
    assert d.to_dict()["tasks"]["a"]["losses"] == 6


def test_pairing_is_by_item_id_not_order():
    old = rows([1, 0, 1])
    new = list(reversed(rows([1, 0, 1])))
    assert decide({"t": old}, {"t": new}).verdicts[0].test.losses == 0


def test_bad_inputs_are_clear_errors():
    with pytest.raises(TaoInputError, match="different items"):
        decide({"t": rows([1, 0])}, {"t": rows([1, 0], prefix="x")})
    with pytest.raises(TaoInputError, match="judge the same tasks"):
        decide({"t": rows([1])}, {"u": rows([1])})
    with pytest.raises(TaoInputError, match="lists item 'q0' twice"):
        decide({"t": rows([1]) * 2}, {"t": rows([1])})
    with pytest.raises(TaoInputError, match="alpha must be in"):
        decide({"t": rows([1])}, {"t": rows([1])}, alpha=0)
    with pytest.raises(TaoInputError, match="finite"):
        paired_test([float("nan")], [1.0])
    with pytest.raises(TaoInputError, match="lacks a prompt_id"):
        decide({"t": [{"value": 1}]}, {"t": rows([1])})
