"""What earlier attacks tell the red team, and how new its attacks are.

* :func:`success_by` tallies attack success (the attack prompt is in ``failures.parquet``) per
  style, writer or category, each rate with its 95% Wilson interval;
* :func:`thompson_posteriors` is the bandit over attack styles: each style's success has a
  Beta(1 + successes, 1 + failures) posterior, and the red team gives a style a share of its
  budget in proportion to its probability of being the best (Thompson sampling, batched), above
  a floor that keeps every style tried (a style that failed early may still work against a
  policy that changes);
* :func:`novelty` measures how far attacks are from the human seeds (character n-grams), so that
  "generated" attacks that merely copy a seed are seen for what they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from selfmoa_ray.report.stats import rate_interval
from selfmoa_ray.sources.dedup import normalize

DRAWS = 4000  # Thompson draws per split: the shares' Monte-Carlo error is below 1 point


def success_by(
    attacks: Iterable[Mapping[str, Any]], succeeded: set[str], key: str
) -> dict[str, dict[str, Any]]:
    """``{value of key: {"prompts", "succeeded", "rate", "ci95"}}`` over attack rows (benign rows
    are not attacks and are left out); rows without the key count as "unknown"."""
    tally: dict[str, list[int]] = {}
    for row in attacks:
        if row.get("split") == "benign":
            continue
        counts = tally.setdefault(str(row.get(key) or "unknown"), [0, 0])
        counts[0] += 1
        counts[1] += row["id"] in succeeded
    return {
        value: {"prompts": n, "succeeded": k, "rate": k / n, "ci95": rate_interval(k, n)}
        for value, (n, k) in sorted(tally.items())
    }


def thompson_posteriors(
    arms: Sequence[str], history: Mapping[str, Mapping[str, Any]], salt: str
) -> dict[str, dict[str, float]]:
    """Per arm (style): its Beta posterior (``alpha`` = 1 + successes, ``beta`` = 1 + failures,
    from ``history``, a :func:`success_by` of earlier iterations) and ``p_best``, its probability
    of being the most successful arm, estimated from ``DRAWS`` seeded draws (``salt``). Spending
    the budget in proportion to ``p_best`` is Thompson sampling, batched."""
    arms = list(dict.fromkeys(arms))
    if not arms:
        return {}
    seen = [history.get(a, {}) for a in arms]
    alpha = np.array([1.0 + h.get("succeeded", 0) for h in seen])
    beta = np.array([1.0 + h.get("prompts", 0) - h.get("succeeded", 0) for h in seen])
    seed = int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little")
    draws = np.random.default_rng(seed).beta(alpha[:, None], beta[:, None], (len(arms), DRAWS))
    wins = np.bincount(draws.argmax(axis=0), minlength=len(arms)) / DRAWS
    return {
        a: {"alpha": float(al), "beta": float(be), "p_best": round(float(w), 4)}
        for a, al, be, w in zip(arms, alpha, beta, wins, strict=True)
    }


def shingles(text: str, n: int = 5) -> frozenset[str]:
    """The character n-grams of a text's normalised form (the whole text when shorter)."""
    text = normalize(text)
    return frozenset(text[i : i + n] for i in range(max(1, len(text) - n + 1)))


def max_similarity(text: str, references: Sequence[frozenset[str]], n: int = 5) -> float:
    """The highest Jaccard similarity of ``text``'s n-grams with any of ``references``."""
    mine = shingles(text, n)
    best = 0.0
    for ref in references:
        inter = len(mine & ref)
        if inter:
            best = max(best, inter / (len(mine) + len(ref) - inter))
    return best


def novelty(texts: Sequence[str], seeds: Sequence[str], n: int = 5) -> float | None:
    """Mean of 1 - (highest n-gram Jaccard with any seed) over ``texts``: 0 when every text is a
    seed, near 1 when none shares phrases with a seed; None without texts."""
    if not texts:
        return None
    refs = [shingles(s, n) for s in seeds]
    return round(float(np.mean([1 - max_similarity(t, refs, n) for t in texts])), 4)
