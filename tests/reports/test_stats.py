"""The statistics behind every table: intervals that cover, paired differences that find a known effect, and
pairing that narrows the interval on correlated scores."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from reports.stats import above_level, format_estimate, interval, paired_difference


def test_one_seed_interval_is_scipys_percentile_bootstrap_of_the_mean():
    scores = np.random.default_rng(1).binomial(1, 0.4, size=(1, 200)).astype(float)
    ours = interval({"chart": scores})
    theirs = scipy_stats.bootstrap((scores[0],), np.mean, method="percentile", n_resamples=4000,
                                   random_state=0).confidence_interval
    assert ours.mean == pytest.approx(scores.mean())
    assert ours.low == pytest.approx(theirs.low, abs=0.01) and ours.high == pytest.approx(theirs.high, abs=0.01)
    assert (ours.seeds, ours.items) == (1, 200)
    # about the binomial standard error: 1.96 * sqrt(0.4 * 0.6 / 200) = 0.068 on each side
    assert ours.high - ours.low == pytest.approx(2 * 1.96 * np.sqrt(0.4 * 0.6 / 200), rel=0.15)


def test_the_95_percent_interval_covers_the_true_accuracy_about_95_times_in_100():
    rng = np.random.default_rng(7)
    truth, covered, trials = 0.6, 0, 200
    for trial in range(trials):
        scores = {"a": rng.binomial(1, truth, size=(1, 100)).astype(float),
                  "b": rng.binomial(1, truth, size=(1, 100)).astype(float)}
        estimate = interval(scores, resamples=1000, seed=trial)
        covered += estimate.low <= truth <= estimate.high
    assert 0.90 <= covered / trials <= 0.99


def test_seeds_widen_the_interval_when_runs_differ():
    """Three training runs whose item scores share a run-level shift: resampling seeds must show it."""
    rng = np.random.default_rng(3)
    shifts = np.array([0.2, 0.5, 0.8])[:, None]
    scores = (rng.random((3, 300)) < shifts).astype(float)
    with_seeds = interval({"x": scores})
    pooled_as_items = interval({"x": scores.reshape(1, -1)})
    assert with_seeds.seeds == 3 and with_seeds.items == 300
    assert (with_seeds.high - with_seeds.low) > 3 * (pooled_as_items.high - pooled_as_items.low)


def test_a_known_paired_effect_is_recovered_and_marked():
    rng = np.random.default_rng(0)
    base = rng.binomial(1, 0.4, size=(1, 300)).astype(float)
    better = base.copy()
    wrong = np.flatnonzero(base[0] == 0)
    better[0, rng.choice(wrong, size=45, replace=False)] = 1.0  # +15 points on the same items
    delta = paired_difference({"x": base}, {"x": better})
    assert delta.mean == pytest.approx(0.15)
    assert delta.low > 0.1 and delta.high < 0.2 and delta.excludes_zero
    assert delta.p_value < 0.001
    assert format_estimate(delta.scaled(100), signed=True).startswith("+15.0 [") and "*" in format_estimate(delta)
    none = paired_difference({"x": base}, {"x": base.copy()})
    assert none.mean == 0 and none.p_value == 1.0 and not none.excludes_zero


def test_the_one_seed_p_value_flips_only_the_items_that_differ():
    """Items with equal scores add 0 under either sign: the test flips the others. Three items differ, all for b,
    among 200: the 2^3 sign patterns are enumerated (exact), and only all-positive or all-negative reach the
    observed sum, so p = 2 / 8."""
    a = np.zeros((1, 200))
    b = a.copy()
    b[0, [5, 70, 150]] = 1.0
    assert paired_difference({"x": a}, {"x": b}).p_value == pytest.approx(0.25)
    # Two columns of unequal size: each item weighs 1 / (2 x its column's items). One item differs in each, so the
    # sums of the 4 sign patterns are +-1/20 +-1/200: only the observed one and its negation reach |observed|.
    small, large = np.zeros((1, 10)), np.zeros((1, 100))
    small_b, large_b = small.copy(), large.copy()
    small_b[0, 3], large_b[0, 40] = 1.0, 1.0
    assert paired_difference({"s": small, "l": large}, {"s": small_b, "l": large_b}).p_value == pytest.approx(0.5)


def test_pairing_narrows_the_interval_on_correlated_scores():
    """Two checkpoints that agree on most items: the paired interval is much narrower than the unpaired one."""
    rng = np.random.default_rng(5)
    a = rng.binomial(1, 0.5, size=(1, 300)).astype(float)
    b = a.copy()
    flip = rng.choice(300, size=30, replace=False)
    b[0, flip] = 1 - b[0, flip]
    paired = paired_difference({"x": a}, {"x": b})
    ia, ib = interval({"x": a}), interval({"x": b})
    unpaired_half_width = 1.96 * np.hypot((ia.high - ia.low) / 3.92, (ib.high - ib.low) / 3.92)
    assert (paired.high - paired.low) / 2 < 0.5 * unpaired_half_width
    assert not paired.excludes_zero or abs(paired.mean) > 0.03


def test_columns_weigh_equally_in_the_average_and_must_pair():
    a = {"small": np.ones((1, 10)), "large": np.zeros((1, 1000))}
    assert interval(a).mean == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same seeds and items"):
        paired_difference({"x": np.ones((1, 10))}, {"x": np.ones((1, 11))})
    with pytest.raises(ValueError, match="same columns"):
        paired_difference({"x": np.ones((1, 10))}, {"y": np.ones((1, 10))})


def test_with_seeds_the_p_value_carries_the_seed_variation_as_the_interval_does():
    """One bad training run makes a large item-level difference; across seeds it is not evidence of an effect."""
    rng = np.random.default_rng(11)
    base = rng.binomial(1, 0.5, size=(3, 300)).astype(float)
    other = base.copy()
    other[0] = 0.0  # seed 0 of the other cell collapsed; seeds 1 and 2 are unchanged
    delta = paired_difference({"x": base}, {"x": other})
    assert delta.mean < -0.1 and not delta.excludes_zero
    assert delta.p_value > 0.05  # consistent with the interval


def test_above_a_level_one_seed_uses_the_exact_binomial_test():
    # 9 of 10 items right against a level of 50%: two-sided P(X >= 9) + P(X <= 1) under Binomial(10, 0.5)
    scores = {"presence": np.array([[100.0] * 9 + [0.0]])}
    estimate = above_level(scores, 50.0)
    assert estimate.mean == pytest.approx(40.0)
    assert estimate.p_value == pytest.approx(2 * (10 + 1) / 2**10)
    plain = interval(scores)
    assert (estimate.low, estimate.high) == pytest.approx((plain.low - 50.0, plain.high - 50.0))
    at_level = above_level({"presence": np.array([[100.0] * 5 + [0.0] * 5])}, 50.0)
    assert at_level.mean == 0.0 and at_level.p_value == pytest.approx(1.0) and not at_level.excludes_zero


def test_above_a_level_with_seeds_takes_the_bootstrap_tails():
    rng = np.random.default_rng(7)
    high = {"counting": 100.0 * rng.binomial(1, 0.8, size=(3, 200))}
    clear = above_level(high, 40.0)
    assert clear.seeds == 3 and clear.low > 30.0 and clear.p_value == 0.0 and clear.excludes_zero
    near = above_level(high, float(high["counting"].mean()))
    assert abs(near.mean) < 1e-9 and near.p_value > 0.5 and not near.excludes_zero
    with pytest.raises(ValueError, match="one column"):
        above_level({"a": high["counting"], "b": high["counting"]}, 40.0)


def test_where_every_differing_item_counts_alike_the_permutation_test_is_the_exact_sign_test():
    """Right/wrong items in columns of one size: each differing item adds +-w, so the sign flips' sum is w times
    (2 x Binomial(m, 1/2) - m). 12 items differ (2^12 = 4,096 sign patterns: scipy enumerates them), 10 for b."""
    a = np.zeros((2, 1, 100))
    b = a.copy()
    b[0, 0, :10] = 1.0  # column x: 10 items right only in b
    b[1, 0, 10:12] = 0.0
    a[1, 0, 10:12] = 1.0  # column y: 2 items right only in a
    delta = paired_difference({"x": a[0], "y": a[1]}, {"x": b[0], "y": b[1]})
    assert delta.p_value == pytest.approx(2 * (1 + 12 + 66) / 2**12)  # P(X <= 2) + P(X >= 10), X ~ Bin(12, 1/2)
    d = np.r_[np.ones(10), -np.ones(2)]
    enumerated = scipy_stats.permutation_test((d,), np.sum, permutation_type="samples", n_resamples=9999,
                                              alternative="two-sided")
    assert delta.p_value == pytest.approx(enumerated.pvalue)
