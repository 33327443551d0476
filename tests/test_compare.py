"""deflect.compare against values worked out by hand: the bootstrap's exact distribution on a
tiny sample, IQMs by counting, pairing by seed, and the direction of lower-is-better metrics."""

from __future__ import annotations

import itertools
import random
import statistics

import numpy as np
import pytest

from deflect.compare import (
    across_datasets,
    best_first,
    bootstrap_interval,
    iqm,
    normalise,
    paired_difference,
    summarise,
)


def exact_bootstrap_quantiles(values: list[float], tail: float) -> tuple[float, float]:
    """The ``tail`` and ``1 - tail`` quantiles of the mean over ALL ``n**n`` equally likely
    resamples (enumerated): the distribution the seeded bootstrap estimates."""
    means = sorted(statistics.mean(s) for s in itertools.product(values, repeat=len(values)))
    cdf = np.arange(1, len(means) + 1) / len(means)
    lo = means[int(np.searchsorted(cdf, tail))]
    hi = means[int(np.searchsorted(cdf, 1 - tail))]
    return lo, hi


def test_bootstrap_interval_of_four_seeds_is_the_exact_resampling_distributions():
    """Seeds scoring 0, 1, 2, 3: the sum of 4 draws from {0..3} has counts 1, 4, 10, 20, ...
    out of 256, so P(mean <= 0.25) = 5/256 < 2.5 % < P(mean <= 0.5) = 15/256: the 2.5 %
    quantile is 0.5 and, by symmetry, the 97.5 % one 2.5."""
    values = [0.0, 1.0, 2.0, 3.0]
    assert exact_bootstrap_quantiles(values, 0.025) == (0.5, 2.5)
    assert bootstrap_interval(values, resamples=10_000, seed=0) == (0.5, 2.5)
    summary = summarise([0.3, 0.1, 0.2, 0.0])  # a shuffled scale of the same: 0.05 .. 0.25
    assert summary.lo == pytest.approx(0.05) and summary.hi == pytest.approx(0.25)
    assert summary.mean == pytest.approx(0.15) and summary.n == 4
    assert summary.std == pytest.approx(statistics.stdev([0.0, 0.1, 0.2, 0.3]))


def test_equal_seeds_give_a_point_interval_and_the_seed_makes_it_reproducible():
    summary = summarise([0.42] * 5)
    assert (summary.mean, summary.std, summary.lo, summary.hi) == pytest.approx(
        (0.42, 0, 0.42, 0.42)
    )
    values = [0.1, 0.5, 0.3, 0.9, 0.7]
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    assert bootstrap_interval(values, resamples=50, seed=1) != bootstrap_interval(
        values, resamples=50, seed=2
    )


def test_iqm_by_hand():
    """[1..8]: drop 2 from each end, mean(3, 4, 5, 6) = 4.5; [1..5]: drop one from each end
    (floor(5/4) = 1), mean(2, 3, 4) = 3; below four values nothing is dropped."""
    assert iqm(list(range(1, 9))) == 4.5
    assert iqm([5, 1, 4, 2, 3]) == 3.0
    assert iqm([8, 1000, 1, 3, 2, 6, 5, 4]) == 4.5  # unsorted, an outlier for 7: still 3-6
    assert iqm([1.0, 2.0, 6.0]) == 3.0
    with pytest.raises(ValueError, match="at least one"):
        iqm([])


def test_paired_difference_pairs_by_seed_not_by_position():
    """Method = reference + (0.1, 0.2, 0.3, 0.4) on seeds 0-3: the differences are those four,
    whatever order the seeds come in; exactly the four-seed case above scaled by 0.1 and
    shifted by 0.1: mean 0.25, interval [0.15, 0.35]. A seed only one side ran is left out."""
    reference = {0: 0.50, 1: 0.20, 2: 0.70, 3: 0.40}
    method = {s: reference[s] + 0.1 * (s + 1) for s in reference}
    paired = paired_difference(method, reference)
    assert paired.seeds == (0, 1, 2, 3)
    assert paired.mean == pytest.approx(0.25)
    assert (paired.lo, paired.hi) == pytest.approx((0.15, 0.35))
    shuffled = list(method.items())
    random.Random(0).shuffle(shuffled)
    assert paired_difference(dict(shuffled), reference) == paired
    with pytest.warns(UserWarning, match=r"seeds \[9\] ran for one side"):
        extra = paired_difference({**method, 9: 0.0}, reference)
    assert extra == paired
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({5: 0.1}, reference)


def test_lower_is_better_ranks_and_signs_the_other_way():
    """RMSE 1.0 against the reference's 2.0 is an improvement of +1 and the best rank; its
    normalised score is 1."""
    method, reference = {0: 1.0, 1: 1.0}, {0: 2.0, 1: 2.0}
    assert paired_difference(method, reference, higher_is_better=False).mean == 1.0
    assert paired_difference(method, reference, higher_is_better=True).mean == -1.0
    assert best_first({"a": 1.0, "b": 2.0}, higher_is_better=False) == ["a", "b"]
    assert best_first({"a": 1.0, "b": 2.0}) == ["b", "a"]
    scores = normalise({"a": [1.0, 2.0], "b": [3.0, 5.0]}, higher_is_better=False)
    assert scores["a"].tolist() == [1.0, 0.75] and scores["b"].tolist() == [0.5, 0.0]
    assert normalise({"a": [4.0], "b": [4.0]})["b"].tolist() == [1.0]


def test_across_datasets_iqm_of_normalised_scores_with_a_stratified_interval():
    """Two datasets, two methods, four seeds. Dataset x (mIoU, higher better): a = 0.2, 0.4,
    0.6, 0.8, b = 0.0 (min) x 3 and 1.0 (max): a normalises to 0.2 .. 0.8. Dataset y (RMSE,
    lower better): a = 1, 1, 1, 1, b = 1 and 3 x 3: max 3, min 1, a -> 1 x 4, b -> 1, 0, 0, 0.
    a's pooled normalised runs: 0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1 -> IQM mean(0.6, 0.8, 1, 1) =
    0.85; b's: 0, 0, 0, 0, 0, 0, 1, 1 -> IQM 0. All of a's y-runs are equal, so its interval
    is the IQM's over x's resamples only; b's interval reaches 0 and stays below a's IQM."""
    table = {
        "x": {"a": [0.2, 0.4, 0.6, 0.8], "b": [0.0, 0.0, 0.0, 1.0]},
        "y": {"a": [1.0, 1.0, 1.0, 1.0], "b": [1.0, 3.0, 3.0, 3.0]},
    }
    out = across_datasets(table, {"x": True, "y": False}, resamples=2_000, seed=0)
    assert out["a"].mean == pytest.approx(0.85) and out["a"].n == 2
    assert out["b"].mean == 0.0
    assert out["a"].lo <= 0.85 <= out["a"].hi and out["a"].hi <= 1.0
    assert out["b"].lo == 0.0 and out["b"].hi < out["a"].mean
    # The stratified bootstrap by hand for a: y is always four 1s, x's four values resampled;
    # the pooled IQM drops the two smallest and the two largest of the 8 (the 1s are largest).
    rng = np.random.default_rng(0)
    x = np.array([0.2, 0.4, 0.6, 0.8])
    hand = [statistics.mean(sorted([*rng.choice(x, 4), 1, 1, 1, 1])[2:6]) for _ in range(2000)]
    lo, hi = np.percentile(hand, [2.5, 97.5])
    assert out["a"].lo == pytest.approx(lo, abs=0.03) and out["a"].hi == pytest.approx(hi)
    # Flipping y's direction makes b the better on y.
    flipped = across_datasets(table, True, resamples=200)
    assert flipped["b"].mean > out["b"].mean
