"""Uncertainty for every rate and every comparison of two policies, computed by scipy.

* a rate (k of n answers safe, refusing...) gets its 95% **Wilson** interval, which stays inside
  [0, 1] and keeps its coverage at the small n and extreme rates of a held-out set;
* a mean score (helpfulness) gets a **bootstrap** interval of the mean;
* two policies that answered the same prompts are compared **paired**: the gain is the mean of
  the per-prompt differences, its interval a bootstrap over prompts, and its p-value **McNemar's
  exact test** (a two-sided binomial test on the prompts where the two disagree). Paired, because
  most prompts get the same verdict from both policies, and an unpaired interval would count that
  shared variation twice.

Resampling is seeded, so the same rows always give the same intervals.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 9999


def _rounded(*values: float) -> list[float]:
    return [round(float(v), 4) for v in values]


def rate_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> list[float]:
    """The Wilson interval ``[low, high]`` of ``successes / n``; ``[0, 1]`` when n is 0."""
    if n == 0:
        return [0.0, 1.0]
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return _rounded(ci.low, ci.high)


def _bootstrap_mean(values: np.ndarray, confidence: float, seed: int) -> list[float]:
    """Percentile bootstrap interval of the mean; a single point when every value is equal."""
    if len(values) == 0:
        return [0.0, 0.0]
    if np.all(values == values[0]):
        return _rounded(values[0], values[0])
    ci = stats.bootstrap(
        (values,),
        np.mean,
        confidence_level=confidence,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return _rounded(ci.low, ci.high)


def mean_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0
) -> list[float]:
    """The bootstrap interval ``[low, high]`` of the mean of ``values``."""
    return _bootstrap_mean(np.asarray(values, dtype=np.float64), confidence, seed)


def paired_gain(
    before: Sequence[bool], after: Sequence[bool], confidence: float = CONFIDENCE, seed: int = 0
) -> dict[str, float | int | list[float]]:
    """The change in a rate between two policies on the same prompts (``after - before``).

    ``before[i]`` and ``after[i]`` are the two policies' outcomes on prompt ``i``. Returns the
    gain, its bootstrap ``interval``, McNemar's exact ``p_value``, the prompts that ``gained``
    (False -> True) and ``lost`` (True -> False), and ``n``.
    """
    a, b = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes differ in length: {a.shape[0]} and {b.shape[0]}")
    gained, lost = int(np.sum(~a & b)), int(np.sum(a & ~b))
    discordant = gained + lost
    p_value = stats.binomtest(gained, discordant, 0.5).pvalue if discordant else 1.0
    diffs = b.astype(np.float64) - a.astype(np.float64)
    return {
        "gain": round(float(diffs.mean()), 4) if len(diffs) else 0.0,
        "interval": _bootstrap_mean(diffs, confidence, seed),
        "p_value": float(f"{p_value:.3g}"),  # 3 significant digits: tiny p-values stay > 0
        "gained": gained,
        "lost": lost,
        "n": int(len(diffs)),
    }
