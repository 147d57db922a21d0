"""``metrics.csv``: one flat row per evaluated policy, for spreadsheets and the terminal table."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from selfmoa_ray.rundir import atomic_write

CSV_COLUMNS = (
    "policy",
    "iteration",
    "harmful_safety",
    "harmful_string_refusal",
    "harmful_strict_refusal",
    "benign_over_refusal",
    "benign_string_refusal",
    "benign_strict_refusal",
    "benign_helpfulness",
    "pairs",
    "prompts",
    "tokens",
    "seconds",
)


def policy_row(policy: dict[str, Any]) -> dict[str, Any]:
    """One policy as the flat row of ``metrics.csv``."""
    harmful, benign, data = policy.get("harmful") or {}, policy.get("benign") or {}, policy["data"]
    return {
        "policy": policy["name"],
        "iteration": policy["iteration"],
        "harmful_safety": harmful.get("safety_rate"),
        "harmful_string_refusal": harmful.get("string_refusal_rate"),
        "harmful_strict_refusal": harmful.get("strict_refusal_rate"),
        "benign_over_refusal": benign.get("over_refusal"),
        "benign_string_refusal": benign.get("string_over_refusal"),
        "benign_strict_refusal": benign.get("strict_over_refusal"),
        "benign_helpfulness": benign.get("helpfulness"),
        "pairs": data.get("pairs"),
        "prompts": data.get("prompts"),
        "tokens": data.get("tokens"),
        "seconds": data.get("seconds"),
    }


def write_metrics_csv(path: Path, policies: list[dict[str, Any]]) -> None:
    """Write ``metrics.csv`` atomically: a header, then :func:`policy_row` of every policy."""
    with atomic_write(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for policy in policies:
            writer.writerow(policy_row(policy))
