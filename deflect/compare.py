"""Statistics for comparing fine-tuning methods over seeds and datasets (numpy only).

The protocol of GEO-Bench-2 (and rliable, Agarwal et al., NeurIPS 2021) in a few functions:

* :func:`summarise`: one method on one dataset: mean ± sample std over its seeds and a
  percentile-bootstrap 95 % interval of the mean.
* :func:`paired_difference`: a method against a reference on the seeds both ran (same seed, same
  data order and initialisation of the shared parts): the mean improvement and its bootstrap
  interval. Pairing removes the seed-to-seed spread the two methods share.
* :func:`across_datasets`: every dataset's runs normalised to [0, 1] (min-max over all methods'
  runs of that dataset, 1 = best), then per method the interquartile mean (IQM) of its
  normalised runs over all datasets, with a stratified bootstrap interval (seeds resampled
  within each dataset, so every resample keeps every dataset).

Every function where the direction matters takes ``higher_is_better`` (``rmse`` is
lower-is-better): normalised scores and improvements are signed so that larger is always better.
The bootstrap is seeded (``seed``) and its size is ``resamples``: the same table gives the same
intervals.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Paired",
    "Summary",
    "across_datasets",
    "best_first",
    "bootstrap_interval",
    "iqm",
    "normalise",
    "paired_difference",
    "summarise",
]

CONFIDENCE = 0.95
RESAMPLES = 10_000


@dataclass(frozen=True)
class Summary:
    """A point estimate with its spread and bootstrap interval over ``n`` values."""

    mean: float
    std: float  # sample standard deviation (0 for one value)
    lo: float
    hi: float
    n: int


@dataclass(frozen=True)
class Paired:
    """``method - reference`` (signed so that > 0 means the method is better) on shared seeds."""

    mean: float
    lo: float
    hi: float
    seeds: tuple  # the seeds paired, sorted


def iqm(values: Sequence[float] | np.ndarray) -> float:
    """Interquartile mean: the mean of the values left after dropping ``floor(n / 4)`` from each
    end of the sorted values (``scipy.stats.trim_mean(x, 0.25)``, which rliable's IQM calls; no
    fractional weights at the quartiles). Four values or fewer: nothing is dropped below 4,
    e.g. ``iqm([1, ..., 8]) = mean(3, 4, 5, 6) = 4.5``."""
    x = np.sort(np.asarray(values, dtype=float).ravel())
    if x.size == 0:
        raise ValueError("iqm of no values: pass at least one score")
    cut = x.size // 4
    return float(x[cut : x.size - cut].mean())


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    """The ``confidence`` percentile interval of bootstrap statistics (numpy's linear rule)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: use a fraction in (0, 1), e.g. 0.95")
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic`` (default: the mean) of ``values``: draw
    ``resamples`` samples of the same size with replacement (``numpy.random.default_rng(seed)``),
    compute the statistic of each, take its ``(1 ± confidence) / 2`` percentiles.

    ``statistic`` maps a ``(resamples, n)`` array to ``(resamples,)``."""
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("bootstrap of no values: pass at least one score")
    rng = np.random.default_rng(seed)
    draws = x[rng.integers(0, x.size, size=(resamples, x.size))]
    stats = draws.mean(axis=1) if statistic is None else statistic(draws)
    return _percentiles(stats, confidence)


def summarise(
    values: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Summary:
    """Mean, sample std and the bootstrap interval of the mean of one method's seeds (the
    direction does not change any of them; :func:`best_first` ranks)."""
    x = np.asarray(values, dtype=float)
    lo, hi = bootstrap_interval(x, confidence=confidence, resamples=resamples, seed=seed)
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return Summary(float(x.mean()), std, lo, hi, int(x.size))


def best_first(means: Mapping[str, float], higher_is_better: bool = True) -> list[str]:
    """Method names from best to worst by their mean."""
    return sorted(means, key=lambda m: -means[m] if higher_is_better else means[m])


def ordered(seeds) -> list:
    """Seeds sorted (numbers as numbers; mixed types by their text)."""
    try:
        return sorted(seeds)
    except TypeError:
        return sorted(seeds, key=str)


def paired_difference(
    method: Mapping[object, float],
    reference: Mapping[object, float],
    higher_is_better: bool = True,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Paired:
    """The improvement of ``method`` over ``reference`` (both ``{seed: score}``) on the seeds
    both ran: ``method - reference`` per seed (``reference - method`` when lower is better, so
    that > 0 always means better), its mean and bootstrap interval.

    Raises:
        ValueError: the two share no seed (nothing to pair).
    """
    shared = ordered(set(method) & set(reference))
    if not shared:
        raise ValueError(
            f"no seed in common: the method ran seeds {ordered(method)}, the reference "
            f"{ordered(reference)}; run both on the same seeds to pair them"
        )
    missing = set(method) ^ set(reference)
    if missing:
        warnings.warn(
            f"paired on seeds {shared} only; seeds {ordered(missing)} ran for one side",
            stacklevel=2,
        )
    sign = 1.0 if higher_is_better else -1.0
    diffs = np.array([sign * (method[s] - reference[s]) for s in shared], dtype=float)
    lo, hi = bootstrap_interval(diffs, confidence=confidence, resamples=resamples, seed=seed)
    return Paired(float(diffs.mean()), lo, hi, tuple(shared))


def normalise(
    runs: Mapping[str, Sequence[float]], higher_is_better: bool = True
) -> dict[str, np.ndarray]:
    """One dataset's scores ``{method: [score per run]}`` mapped to [0, 1] by min-max over every
    run of every method: 1 is the best run of the dataset, 0 the worst (flipped when lower is
    better). When all runs score the same, all get 1 (no method is worse)."""
    pooled = np.concatenate([np.asarray(v, dtype=float) for v in runs.values()])
    lo, hi = float(pooled.min()), float(pooled.max())
    out = {}
    for name, values in runs.items():
        x = np.asarray(values, dtype=float)
        if hi == lo:
            out[name] = np.ones_like(x)
        else:
            out[name] = (x - lo) / (hi - lo) if higher_is_better else (hi - x) / (hi - lo)
    return out


def across_datasets(
    table: Mapping[str, Mapping[str, Sequence[float]]],
    higher_is_better: bool | Mapping[str, bool] = True,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Summary]:
    """Per method, the IQM of its normalised runs pooled over datasets, with a stratified
    bootstrap interval.

    Args:
        table: ``{dataset: {method: [score per seed]}}``.
        higher_is_better: one direction for all datasets, or ``{dataset: direction}``.

    Returns:
        ``{method: Summary}`` whose ``mean`` is the IQM, ``std`` the sample std of the normalised
        runs, ``n`` the number of datasets the method ran on (a method is scored on those only).
    """
    per_method: dict[str, list[np.ndarray]] = {}
    for dataset, runs in table.items():
        direction = (
            higher_is_better[dataset] if isinstance(higher_is_better, Mapping) else higher_is_better
        )
        for name, scores in normalise(runs, direction).items():
            per_method.setdefault(name, []).append(scores)
    rng = np.random.default_rng(seed)
    out = {}
    for name, strata in per_method.items():
        pooled = np.concatenate(strata)
        draws = np.concatenate(
            [s[rng.integers(0, s.size, size=(resamples, s.size))] for s in strata], axis=1
        )
        cut = draws.shape[1] // 4  # iqm of every resample at once
        stats = np.sort(draws, axis=1)[:, cut : draws.shape[1] - cut].mean(axis=1)
        lo, hi = _percentiles(stats, confidence)
        std = float(pooled.std(ddof=1)) if pooled.size > 1 else 0.0
        out[name] = Summary(iqm(pooled), std, lo, hi, len(strata))
    return out
