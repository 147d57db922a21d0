"""Plain-text tables for the terminal: the numbers a user looks at first."""

from __future__ import annotations

from typing import Any

from selfmoa_ray.report.csvfile import policy_row
from selfmoa_ray.report.formats import gain, pct, score


def _rate(m: dict[str, Any], key: str) -> str:
    """A rate in percent with its 95% interval where the summary has one: ``67.5 [52-80]``."""
    if m.get(key) is None:
        return "-"
    low_high = (m.get("intervals") or {}).get(key)
    if not low_high:
        return f"{100 * m[key]:.1f}"
    return f"{100 * m[key]:.1f} [{100 * low_high[0]:.0f}-{100 * low_high[1]:.0f}]"


def print_metrics(policies: dict[str, dict[str, Any]]) -> None:
    """One row per (policy, split): safety, refusal (judge, classic and strict matchers) and
    helpfulness; rates in percent with their 95% intervals."""
    columns = (
        ("safety", "safety_rate"),
        ("refusal", "refusal_rate"),
        ("refusal(classic)", "string_refusal_rate"),
        ("refusal(strict)", "strict_refusal_rate"),
    )
    header = (
        f"{'policy':<12} {'split':<14} {'n':>4} "
        + " ".join(f"{name:>16}" for name, _ in columns)
        + f" {'helpful':>8} {'tokens':>7}"
    )
    print(header)
    print("-" * len(header))
    for policy, splits in policies.items():
        for split, m in splits.items():
            rates = " ".join(f"{_rate(m, key):>16}" for _, key in columns)
            print(
                f"{policy:<12} {split:<14} {m['responses']:>4} {rates} "
                f"{m['helpfulness']:>8.3f} {m['response_tokens']:>7}"
            )


def print_examples(
    rows: list[dict[str, Any]], split: str, count: int = 2, width: int = 160
) -> None:
    """A few prompts of ``split`` with their responses, shortened to one line each."""
    picked = [r for r in rows if r["split"] == split][:count]
    for row in picked:
        response = " ".join(str(row["response"]).split())
        print(f"\n[{split}] {row['text'][:width]}")
        print(f"  -> {response[:width]}{'...' if len(response) > width else ''}")


def print_before_after(collected: dict[str, Any]) -> None:
    """A compact terminal table: every policy's held-out numbers, with the change since the first."""
    policies = collected["policies"]
    if not policies:
        print("no policy evaluated yet")
        return
    header = (
        f"{'policy':<10} {'safety':>7} {'(str)':>7} {'over-ref':>8} {'(str)':>7} "
        f"{'helpful':>8}   {'chg safety':>10} {'chg over-ref':>12}"
    )
    print(header)
    print("-" * len(header))
    first = policy_row(policies[0])

    def diff(r: dict[str, Any], key: str) -> str:
        if r is first or r[key] is None or first[key] is None:
            return ""
        return f"{100 * (r[key] - first[key]):+.1f}pts"

    for policy in policies:
        r = first if policy is policies[0] else policy_row(policy)
        print(
            f"{r['policy']:<10} {pct(r['harmful_safety']):>7} {pct(r['harmful_string_refusal']):>7} "
            f"{pct(r['benign_over_refusal']):>8} {pct(r['benign_string_refusal']):>7} "
            f"{score(r['benign_helpfulness']):>8}   {diff(r, 'harmful_safety'):>10} "
            f"{diff(r, 'benign_over_refusal'):>12}"
        )
    print(
        "safety = harmful prompts judged safe; (str) = refusal-prefix matcher; "
        "over-ref = refusals of benign prompts"
    )
    head = collected.get("headline") or {}
    gains = {r["metric"]: r.get("paired") for r in head.get("rows", [])}
    shown = [
        (label, gains.get(metric))
        for metric, label in (
            ("harmful/safety_rate", "safety"),
            ("benign/over_refusal", "over-refusal"),
        )
    ]
    if any(paired for _, paired in shown):
        print(
            f"paired change {head['before']} -> {head['after']}, pts [95% interval]: "
            + "; ".join(f"{label} {gain(paired)}" for label, paired in shown if paired)
        )
