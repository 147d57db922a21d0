"""Intervals and paired tests, checked against their textbook formulas on crafted counts, and the
paired gains of two evaluated policies read from their rows."""

import math

import numpy as np
import pytest

from selfmoa_ray.report.gains import paired_gains
from selfmoa_ray.report.metrics import summarize
from selfmoa_ray.report.stats import mean_interval, paired_gain, rate_interval

Z = 1.959963984540054  # the standard normal's 97.5% quantile


def _wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson's score interval, written out (Wilson 1927; Agresti & Coull 1998, eq. 2)."""
    p = k / n
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z / (1 + Z**2 / n) * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(0, 40), (27, 40), (40, 40), (1, 200), (131, 200), (7, 150)])
def test_rate_interval_is_wilsons(k, n):
    low, high = rate_interval(k, n)
    assert (low, high) == pytest.approx(_wilson(k, n), abs=1e-4)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_rate_interval_narrows_with_n_and_has_no_data_edge():
    """The demo's old 40 prompts against the full 200: the interval shrinks by about sqrt(5)."""
    small, large = rate_interval(27, 40), rate_interval(135, 200)
    assert (small[1] - small[0]) / (large[1] - large[0]) == pytest.approx(math.sqrt(5), rel=0.1)
    assert rate_interval(0, 0) == [0.0, 1.0]


def _outcomes(gained: int, lost: int, both: int, neither: int) -> tuple[list[bool], list[bool]]:
    before = [False] * gained + [True] * lost + [True] * both + [False] * neither
    after = [True] * gained + [False] * lost + [True] * both + [False] * neither
    return before, after


def test_paired_gain_is_mcnemars_exact_test():
    """p-value = two-sided binomial tail of the discordant prompts at 1/2, written out."""
    result = paired_gain(*_outcomes(gained=10, lost=3, both=120, neither=67))
    tail = sum(math.comb(13, i) for i in range(0, 4)) / 2**13
    assert result["p_value"] == pytest.approx(min(1.0, 2 * tail), rel=1e-3)  # 3 digits kept
    assert (result["gained"], result["lost"], result["n"]) == (10, 3, 200)
    assert result["gain"] == pytest.approx(7 / 200, abs=1e-4)


def test_paired_interval_matches_the_normal_approximation_and_is_seeded():
    """Bootstrap interval of the mean difference against its large-sample normal interval, with
    the variance of a paired difference of proportions (Agresti, Categorical Data Analysis 10.1)."""
    gained, lost, n = 30, 10, 350
    before, after = _outcomes(gained, lost, both=200, neither=110)
    result = paired_gain(before, after)
    d = (gained - lost) / n
    se = math.sqrt(((gained + lost) / n - d**2) / n)
    low, high = result["interval"]
    assert low == pytest.approx(d - Z * se, abs=0.01)
    assert high == pytest.approx(d + Z * se, abs=0.01)
    assert low > 0  # 20 more prompts of 350 made safe, out of 40 that changed: a real gain
    assert paired_gain(before, after) == result  # seeded: the same rows, the same interval


def test_a_gain_inside_the_noise_has_an_interval_holding_zero():
    result = paired_gain(*_outcomes(gained=6, lost=3, both=20, neither=11))
    assert result["interval"][0] < 0 < result["interval"][1]
    assert result["p_value"] > 0.05


def test_no_change_and_bad_input():
    same = [True, False, True]
    assert paired_gain(same, same) == {
        "gain": 0.0,
        "interval": [0.0, 0.0],
        "p_value": 1.0,
        "gained": 0,
        "lost": 0,
        "n": 3,
    }
    with pytest.raises(ValueError, match="differ in length"):
        paired_gain([True], [True, False])


def test_mean_interval_holds_the_mean():
    values = np.random.default_rng(1).uniform(0.2, 0.9, size=150)
    low, high = mean_interval(values)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * Z * values.std(ddof=1) / math.sqrt(150), rel=0.15)
    assert mean_interval([0.5, 0.5]) == [0.5, 0.5]


def _row(i: int, split: str, safe: bool, refusal: bool, strict: bool) -> dict:
    return {
        "id": f"p{i}",
        "sample_index": 0,
        "split": split,
        "category": "c",
        "safety": 0.9 if safe else 0.1,
        "refusal": refusal,
        "refusal_flag": refusal,
        "refusal_strict_flag": strict,
        "helpfulness": 0.5,
        "response_tokens": 4,
    }


def test_paired_gains_match_answers_by_prompt_not_by_position():
    before = [_row(i, "eval_harmful", safe=i < 5, refusal=False, strict=False) for i in range(10)]
    after = [_row(i, "eval_harmful", safe=i < 8, refusal=i < 2, strict=i < 1) for i in range(10)]
    gains = paired_gains(before, list(reversed(after)))["eval_harmful"]
    assert gains["safety_rate"]["gain"] == pytest.approx(0.3)
    assert (gains["safety_rate"]["gained"], gains["safety_rate"]["lost"]) == (3, 0)
    assert gains["string_refusal_rate"]["gain"] == pytest.approx(0.2)
    assert gains["strict_refusal_rate"]["gain"] == pytest.approx(0.1)


def test_summary_carries_an_interval_for_every_rate():
    rows = [_row(i, "eval_benign", safe=True, refusal=i < 3, strict=i < 1) for i in range(40)]
    split = summarize(rows)["eval_benign"]
    assert split["strict_refusal_rate"] == 0.025 and split["string_refusal_rate"] == 0.075
    assert split["intervals"]["string_refusal_rate"] == rate_interval(3, 40)
    assert set(split["intervals"]) == {
        "safety_rate",
        "refusal_rate",
        "string_refusal_rate",
        "strict_refusal_rate",
        "helpfulness",
    }
