"""Paired gains between two evaluated policies of one run: every rate, prompt by prompt.

Both policies answered the same held-out prompts (the same seeded sample, greedy by default), so
each rate's change is measured on matched answers (report/stats.paired_gain): the gain, its 95%
interval and McNemar's exact p-value. The loop's acceptance rule and the report read these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from selfmoa_ray.report.metrics import RATES, outcomes_of
from selfmoa_ray.report.stats import paired_gain

EVAL_RESPONSES = "eval_responses.parquet"  # per policy folder, written by stages/evaluate.py
_COLUMNS = ("id", "sample_index", "split", "safety", "refusal", "refusal_flag")


def eval_rows(root: Path, policy: str) -> list[dict[str, Any]] | None:
    """The judged held-out answers of ``policy`` in the run at ``root``; None if not evaluated."""
    path = Path(root) / policy / EVAL_RESPONSES
    if not path.exists():
        return None
    names = pq.read_schema(path).names
    columns = [c for c in (*_COLUMNS, "refusal_strict_flag") if c in names]
    return pq.read_table(path, columns=columns).to_pylist()


def paired_gains(
    before: list[dict[str, Any]], after: list[dict[str, Any]], unsafe_threshold: float = 0.5
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{split: {rate key: paired gain}}`` over the answers both policies gave (matched by split,
    prompt id and sample index); splits or rates only one side has are left out."""

    def keyed(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
        return {(r["split"], str(r["id"]), int(r["sample_index"])): r for r in rows}

    a, b = keyed(before), keyed(after)
    shared = sorted(a.keys() & b.keys())
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for split in sorted({key[0] for key in shared}):
        keys = [key for key in shared if key[0] == split]
        old = outcomes_of([a[k] for k in keys], unsafe_threshold)
        new = outcomes_of([b[k] for k in keys], unsafe_threshold)
        out[split] = {
            RATES[name]: paired_gain(old[name], new[name]) for name in old.keys() & new.keys()
        }
    return out


def run_gains(
    root: Path, before: str, after: str, unsafe_threshold: float = 0.5
) -> dict[str, dict[str, dict[str, Any]]] | None:
    """:func:`paired_gains` of two policies of the run at ``root``; None if either is missing."""
    old, new = eval_rows(root, before), eval_rows(root, after)
    if old is None or new is None:
        return None
    return paired_gains(old, new, unsafe_threshold)
