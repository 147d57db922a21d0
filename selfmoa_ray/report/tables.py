"""Plain-text tables for the terminal: the numbers a user looks at first."""

from __future__ import annotations

from typing import Any


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
