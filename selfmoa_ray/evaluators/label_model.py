"""A label model for the judge: binary Dawid-Skene fitted by EM over the evaluators' votes.

Why: the judge's evaluators (probe heads, refusal matchers, a guard model) differ in how often
they are right, and a fixed weighted mean cannot learn that. Dawid-Skene (1979) treats each row's
safety as a hidden class and each labeler as a noisy channel with its own sensitivity
``P(vote safe | safe)`` and specificity ``P(vote unsafe | unsafe)``; EM estimates those and the
class prior from the votes alone, then gives each row its posterior ``P(safe | votes)``. It is
unsupervised: it never sees a human label (the benchmark scores it against them afterwards).

Votes are 1.0 (safe), 0.0 (unsafe) or NaN (abstain: ignored, i.e. taken as missing at random).
The judge fits it once per stage over all the rows it judged (stages/judge.py says why), not per
Ray Data batch.

Choices that keep it from dividing by zero or collapsing:

* **initialisation** from the (soft) majority vote, so EM starts on the side of the labelers;
* **smoothing**: ``smoothing`` pseudo-votes of each kind per labeler and per class (a symmetric
  Beta prior, i.e. MAP EM), so every estimate stays strictly inside (0, 1) and a labeler that
  never votes, or one class that never occurs, leaves its estimates at 0.5 instead of 0/0;
* **orientation**: the likelihood is the same with the classes swapped, so after fitting, if the
  labelers are on average worse than chance (mean sensitivity + specificity < 1), the solution
  is flipped, assuming the labelers are better than chance on average;
* at least ``MIN_LABELERS`` (3) labelers: with two binary labelers the model is not identifiable
  (more parameters than the vote table has cells), so the answer would be the initialisation's.

Its assumption, which the judge's labelers break: the labelers err independently given the class.
Correlated labelers (three heads on one embedding) count as more evidence than they are, which
makes posteriors sharper than they should be; a near-duplicate pair can capture the hidden class
outright, which is why the judge votes with one refusal matcher, not two (composite.py).

Maintained libraries were checked first (2026-12-05): ``snorkel`` 0.10.0 (last release 2024-02)
pulls tensorboard, networkx and munkres; ``crowd-kit`` 1.4.2 installs against our pins but adds
nltk, takes ~5 s to import, wants long-format pandas, drops rows without votes and has no
smoothing. This module is ~100 lines of numpy with the behaviour above, tested on votes drawn
from a known model (tests/evaluators/test_label_model.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit

MIN_LABELERS = 3


def check_votes(votes: Any, labelers: int | None = None) -> np.ndarray:
    """``votes`` as a float64 (rows, labelers) array of 1.0 / 0.0 / NaN; ValueError otherwise."""
    array = np.asarray(votes, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"votes must be a 2-D (rows, labelers) array, got shape {array.shape}")
    if labelers is not None and array.shape[1] != labelers:
        raise ValueError(f"votes have {array.shape[1]} labelers, the model has {labelers}")
    bad = ~(np.isnan(array) | (array == 0.0) | (array == 1.0))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"votes must be 1 (safe), 0 (unsafe) or NaN (abstain); row {row}, labeler {col} "
            f"is {float(array[row, col])}"
        )
    return array


def majority_vote(votes: Any) -> np.ndarray:
    """The share of non-abstaining labelers voting safe per row; 0.5 where all abstain."""
    array = check_votes(votes)
    said = (~np.isnan(array)).sum(axis=1)
    safe = np.nansum(array, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(said > 0, safe / np.maximum(said, 1), 0.5)


def _posterior(
    votes: np.ndarray, prior: float, sensitivity: np.ndarray, specificity: np.ndarray
) -> np.ndarray:
    """P(safe | votes) per row: Bayes with independent labelers, abstains contributing nothing."""
    safe, unsafe = votes == 1.0, votes == 0.0
    # log P(vote | safe) - log P(vote | unsafe), per observed vote
    said_safe = np.log(sensitivity) - np.log1p(-specificity)
    said_unsafe = np.log1p(-sensitivity) - np.log(specificity)
    logit = np.log(prior) - np.log1p(-prior) + safe @ said_safe + unsafe @ said_unsafe
    return expit(logit)


@dataclass(frozen=True)
class LabelModel:
    """A fitted binary Dawid-Skene model (``fit_label_model``)."""

    labelers: tuple[str, ...]
    prior: float  # P(safe)
    sensitivity: np.ndarray  # per labeler, P(vote safe | safe)
    specificity: np.ndarray  # per labeler, P(vote unsafe | unsafe)
    iterations: int
    converged: bool
    rows: int

    def posterior(self, votes: Any) -> np.ndarray:
        """P(safe) per row of ``votes`` (columns in ``labelers`` order)."""
        array = check_votes(votes, len(self.labelers))
        return _posterior(array, self.prior, self.sensitivity, self.specificity)

    def summary(self) -> dict[str, Any]:
        """The fitted parameters, rounded, for a stage manifest or a log line."""
        return {
            "rows": self.rows,
            "prior_safe": round(self.prior, 4),
            "iterations": self.iterations,
            "converged": self.converged,
            "labelers": {
                name: {"sensitivity": round(float(a), 4), "specificity": round(float(b), 4)}
                for name, a, b in zip(
                    self.labelers, self.sensitivity, self.specificity, strict=True
                )
            },
        }


def fit_label_model(
    votes: Any,
    labelers: Sequence[str] | None = None,
    *,
    smoothing: float = 1.0,
    max_iter: int = 500,
    tol: float = 1e-7,
) -> LabelModel:
    """Fit binary Dawid-Skene by EM on ``votes`` (rows, labelers): 1 safe, 0 unsafe, NaN abstain.

    Deterministic (no random start). ``smoothing``: pseudo-votes per labeler and class (> 0).
    """
    array = check_votes(votes)
    n, m = array.shape
    names = tuple(labelers) if labelers is not None else tuple(f"labeler_{j}" for j in range(m))
    if len(names) != m:
        raise ValueError(f"{len(names)} labeler names for {m} columns of votes")
    if m < MIN_LABELERS:
        raise ValueError(
            f"a label model needs at least {MIN_LABELERS} labelers to be identifiable, got {m} "
            f"({', '.join(names) or 'none'})"
        )
    if n == 0:
        raise ValueError("no rows of votes to fit a label model on")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    observed = ~np.isnan(array)
    safe, unsafe = (array == 1.0).astype(np.float64), (array == 0.0).astype(np.float64)
    seen = observed.astype(np.float64)
    q = majority_vote(array)  # P(safe) per row
    params = np.full(1 + 2 * m, np.nan)
    converged, iterations = False, 0
    while not converged and iterations < max_iter:
        iterations += 1
        # M-step (MAP under a symmetric Beta prior of ``smoothing`` pseudo-votes)
        prior = (q.sum() + smoothing) / (n + 2 * smoothing)
        sensitivity = (q @ safe + smoothing) / (q @ seen + 2 * smoothing)
        specificity = ((1 - q) @ unsafe + smoothing) / ((1 - q) @ seen + 2 * smoothing)
        # E-step
        q = _posterior(array, prior, sensitivity, specificity)
        new = np.r_[prior, sensitivity, specificity]
        converged = bool(np.max(np.abs(new - params)) < tol)
        params = new
    if np.mean(sensitivity + specificity) < 1.0:  # the class-swapped twin of the same fit
        prior, sensitivity, specificity = 1.0 - prior, 1.0 - specificity, 1.0 - sensitivity
    return LabelModel(
        labelers=names,
        prior=float(prior),
        sensitivity=sensitivity,
        specificity=specificity,
        iterations=iterations,
        converged=converged,
        rows=n,
    )
