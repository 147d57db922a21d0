"""Plain-text tables for the terminal: the numbers a user looks at first."""

from __future__ import annotations

from typing import Any


def print_metrics(policies: dict[str, dict[str, Any]]) -> None:
    """One row per (policy, split): responses, refusal rate, tokens generated."""
    header = f"{'policy':<12} {'split':<14} {'responses':>9} {'refusal rate':>12} {'tokens':>8}"
    print(header)
    print("-" * len(header))
    for policy, splits in policies.items():
        for split, m in splits.items():
            print(
                f"{policy:<12} {split:<14} {m['responses']:>9} "
                f"{m['refusal_rate']:>12.1%} {m['response_tokens']:>8}"
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
