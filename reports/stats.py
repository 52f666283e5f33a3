"""Uncertainty of accuracies and of paired differences, computed from lmms-eval's per-sample scores.

A cell's scores are, per column (a task family or benchmark), an array [seeds, items]: the per-item score of each
seed's evaluation, items in doc-id order. Two cells pair when they hold the same seeds and the same items.

- `interval`: the mean (over seeds, then over items; `Avg` weighs every column equally) and its 95% percentile
  bootstrap interval. The bootstrap has two levels: the seeds are resampled (when there are several: a seed is a
  training run, and its runs' items are correlated), then the items of every column (stratified). With one seed
  it is scipy.stats.bootstrap's percentile interval of the mean (tests/reports/test_stats.py checks the two agree).
- `paired_difference`: the mean of b - a over the same seeds and items, its interval from the same two-level
  bootstrap applied to both cells at once (the same resampled seeds and items), and a two-sided p-value: with one
  seed, a paired permutation test (scipy.stats.permutation_test: each item's two scores swapped at random; where
  every differing item moves the mean alike, as right/wrong items in columns of one size do, its exact form, the
  sign test on those items, scipy.stats.binomtest); with
  several, twice the bootstrap's smaller tail at 0. The p-value then carries the seed-to-seed variation as the
  interval does: a permutation test over seed-averaged items would treat the seeds as fixed and could call a
  difference significant that one training run made.
- `above_level`: one column's mean minus a fixed level (the share a constant answer gets right), its interval and a
  p-value (an exact binomial test for one seed's right/wrong items).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 4000
PERMUTATIONS = 9999
# Sign flips drawn this many at a time: the same draws and p-value as all at once, ~3x faster here (the arrays of
# 1,200 items x 10,000 flips at once overflow the caches)
PERMUTATION_BATCH = 2000
SEED = 0  # the bootstrap's own seed: equal scores give equal intervals


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval, over `seeds` seeds and `items` items (summed over columns)."""

    mean: float
    low: float
    high: float
    seeds: int
    items: int
    p_value: float = math.nan  # paired differences only: H0 "no difference"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def scaled(self, factor: float) -> Estimate:
        return Estimate(self.mean * factor, self.low * factor, self.high * factor, self.seeds, self.items,
                        self.p_value)


def _check(scores: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    arrays = [np.asarray(a, dtype=float) for a in scores.values()]
    if not arrays or any(a.ndim != 2 or a.shape[1] == 0 for a in arrays):
        raise ValueError("scores: one non-empty [seeds, items] array per column expected")
    if len({a.shape[0] for a in arrays}) != 1:
        raise ValueError("scores: every column needs the same seeds")
    return arrays


def bootstrap_means(scores: Mapping[str, np.ndarray], resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """[resamples] bootstrap replicates of the column-averaged mean: seeds resampled (when more than one), then
    each column's items."""
    arrays = _check(scores)
    rng = np.random.default_rng(seed)
    n_seeds = arrays[0].shape[0]
    seeds = rng.integers(n_seeds, size=(resamples, n_seeds)) if n_seeds > 1 else np.zeros((resamples, 1), int)
    total = np.zeros(resamples)
    for array in arrays:
        items = rng.integers(array.shape[1], size=(resamples, array.shape[1]))
        per_seed = array[:, items].mean(-1).T  # [resamples, seeds]: each seed's mean over the resampled items
        total += np.take_along_axis(per_seed, seeds, axis=1).mean(1)
    return total / len(arrays)


def _mean(arrays: list[np.ndarray]) -> float:
    return float(np.mean([a.mean() for a in arrays]))


def _estimate(arrays: list[np.ndarray], replicates: np.ndarray, p_value: float = math.nan) -> Estimate:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Estimate(_mean(arrays), float(low), float(high), arrays[0].shape[0], sum(a.shape[1] for a in arrays),
                    p_value)


def interval(scores: Mapping[str, np.ndarray], resamples: int = RESAMPLES, seed: int = SEED) -> Estimate:
    return _estimate(_check(scores), bootstrap_means(scores, resamples, seed))


def paired_difference(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], resamples: int = RESAMPLES,
                      permutations: int = PERMUTATIONS, seed: int = SEED) -> Estimate:
    """b - a over the same columns, seeds and items (each column's arrays of equal shape, items in one order)."""
    if a.keys() != b.keys():
        raise ValueError(f"paired cells need the same columns: {sorted(a)} vs {sorted(b)}")
    for column in a:
        if np.shape(a[column]) != np.shape(b[column]):
            raise ValueError(f"{column}: paired cells need the same seeds and items, got "
                             f"{np.shape(a[column])} and {np.shape(b[column])}")
    differences = {column: np.asarray(b[column], float) - np.asarray(a[column], float) for column in a}
    arrays = _check(differences)
    replicates = bootstrap_means(differences, resamples, seed)
    if arrays[0].shape[0] > 1:
        # Seeds vary between training runs: the p-value comes from the same two-level bootstrap as the interval
        # (twice the smaller tail at 0), so that `*` and p < 0.05 agree.
        return _estimate(arrays, replicates, float(min(1.0, 2 * min(np.mean(replicates <= 0),
                                                                     np.mean(replicates >= 0)))))
    # One seed: a paired permutation test over items, each item weighted so that columns count equally. Swapping
    # an item's pair flips the sign of its difference, so the test runs on the differences alone (scipy's
    # one-sample "samples" test flips signs): the same null distribution, half the work. An item whose two scores
    # are equal adds 0 under either sign, so only the items that differ are flipped: the same null distribution
    # again, drawn over a fraction of the items (two checkpoints' 0/1 scores differ on about a third of them).
    d = np.concatenate([differences[c][0] for c in a])
    weights = np.concatenate([np.full(np.shape(a[c])[1], 1 / (len(a) * np.shape(a[c])[1])) for c in a])
    differ = d != 0
    d, weights = d[differ], weights[differ]
    if not d.size:
        p_value = 1.0
    elif np.unique(np.abs(d * weights)).size == 1:
        # Every differing item moves the sum by the same amount (right/wrong scores, columns of one size): the sign
        # flips' distribution of the sum is then a binomial's, and the exact sign test (McNemar's exact test on the
        # items the two cells score differently) is the permutation test enumerated, without resampling.
        p_value = float(stats.binomtest(int((d > 0).sum()), d.size, 0.5).pvalue)
    else:
        result = stats.permutation_test(
            (d,), lambda flipped, axis=-1: np.sum(weights * flipped, axis=axis), permutation_type="samples",
            vectorized=True, n_resamples=permutations, alternative="two-sided", random_state=seed,
            batch=PERMUTATION_BATCH)
        p_value = float(result.pvalue)
    return _estimate(arrays, replicates, p_value)


def above_level(scores: Mapping[str, np.ndarray], level: float, resamples: int = RESAMPLES,
                seed: int = SEED) -> Estimate:
    """One column's mean minus a fixed `level` (a baseline that does not move with the items drawn: the share of a
    suite's items one constant answer gets right), with `interval`'s bootstrap interval shifted by it, and a
    two-sided p-value for H0 "mean = level": with one seed and scores of 0 or 100 per item, the exact binomial
    test (scipy.stats.binomtest); else twice the bootstrap's smaller tail at the level. Scores and level in %."""
    arrays = _check(scores)
    if len(arrays) != 1:
        raise ValueError(f"above_level: one column expected, got {sorted(scores)}")
    (array,) = arrays
    replicates = bootstrap_means(scores, resamples, seed)
    if array.shape[0] == 1 and np.isin(array, (0.0, 100.0)).all():
        p_value = stats.binomtest(int((array == 100.0).sum()), array.shape[1], level / 100.0).pvalue
    else:
        p_value = min(1.0, 2 * min(np.mean(replicates <= level), np.mean(replicates >= level)))
    estimate = _estimate(arrays, replicates, float(p_value))
    return Estimate(estimate.mean - level, estimate.low - level, estimate.high - level, estimate.seeds,
                    estimate.items, estimate.p_value)


def estimate_json(estimate: Estimate | None) -> dict | None:
    """An estimate as JSON values (NaN, e.g. an accuracy's p-value, as null)."""
    if estimate is None:
        return None
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(estimate).items()}


def format_estimate(estimate: Estimate | None, digits: int = 1, signed: bool = False) -> str:
    """'41.3 [34.7, 48.0]'; a paired difference as '+3.2 [-1.0, 7.5] p=0.14', marked '*' when its interval
    excludes 0."""
    if estimate is None or math.isnan(estimate.mean):
        return "-"
    sign = "+" if signed else ""
    text = f"{estimate.mean:{sign}.{digits}f} [{estimate.low:.{digits}f}, {estimate.high:.{digits}f}]"
    if not math.isnan(estimate.p_value):
        text += f" p={estimate.p_value:.2g}" + (" *" if estimate.excludes_zero else "")
    return text
