"""Plain-text tables for the terminal: the numbers a user looks at first."""

from __future__ import annotations

from typing import Any


def print_metrics(policies: dict[str, dict[str, Any]]) -> None:
    """One row per (policy, split): safety, refusal (judge and string match), helpfulness."""
    header = (
        f"{'policy':<12} {'split':<14} {'n':>4} {'safety':>7} {'refusal':>8} "
        f"{'refusal(str)':>12} {'helpful':>8} {'tokens':>7}"
    )
    print(header)
    print("-" * len(header))
    for policy, splits in policies.items():
        for split, m in splits.items():
            print(
                f"{policy:<12} {split:<14} {m['responses']:>4} {m['safety_rate']:>7.1%} "
                f"{m['refusal_rate']:>8.1%} {m['string_refusal_rate']:>12.1%} "
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
