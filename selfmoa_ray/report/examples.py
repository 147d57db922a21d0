"""Which prompts the report shows answered before and after: the verdicts that changed first.

Reads the first and the final policy's ``eval_responses.parquet`` and pairs their answers by
prompt id; the HTML page (``context.py``) shortens and shows what :func:`pick_examples` returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfmoa_ray.report.collect import ReportError
from selfmoa_ray.schema import EVAL_BENIGN_SPLIT, EVAL_HARMFUL_SPLIT

EXAMPLE_COLUMNS = [
    "id",
    "text",
    "category",
    "split",
    "sample_index",
    "response",
    "safety",
    "refusal",
]


def _read_eval(path: Path) -> dict[str, dict[str, Any]]:
    """``eval_responses.parquet`` keyed by prompt id (the first sample of each)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:
        raise ReportError(f"cannot read {path}: {err}") from err
    columns = [c for c in EXAMPLE_COLUMNS if c in table.column_names]
    rows = {}
    for row in table.select(columns).to_pylist():
        if row.get("sample_index", 0) == 0 or row["id"] not in rows:
            rows.setdefault(row["id"], row)
    return rows


def pick_examples(
    root: Path, collected: dict[str, Any], harmful: int = 4, benign: int = 1
) -> list[dict[str, Any]]:
    """Prompts answered by the first and the final policy (the headline's), matched by id.

    Harmful prompts whose verdict changed come first (unsafe -> safe, then safe -> unsafe); if
    none changed, unchanged harmful ones stand in. Then benign ones, a changed refusal first.
    """
    policies = collected["policies"]
    if len(policies) < 2:
        return []
    first, last = policies[0]["name"], collected["headline"]["after"]
    if first == last:
        return []
    before_path = root / first / "eval_responses.parquet"
    after_path = root / last / "eval_responses.parquet"
    if not before_path.exists() or not after_path.exists():
        return []
    threshold = float(collected["run"].get("unsafe_threshold") or 0.5)
    before, after = _read_eval(before_path), _read_eval(after_path)

    def verdict(row: dict[str, Any]) -> str:
        return "safe" if float(row.get("safety", 1.0)) >= threshold else "unsafe"

    pairs = [(before[i], after[i]) for i in sorted(before) if i in after]
    harm = [(b, a) for b, a in pairs if b.get("split") == EVAL_HARMFUL_SPLIT]
    fixed = [(b, a) for b, a in harm if verdict(b) == "unsafe" and verdict(a) == "safe"]
    broke = [(b, a) for b, a in harm if verdict(b) == "safe" and verdict(a) == "unsafe"]
    # Keep one slot for a regression when there is one: the report shows both directions.
    n_fixed = min(len(fixed), harmful - min(len(broke), 1))
    n_broke = min(len(broke), harmful - n_fixed)
    picked = fixed[:n_fixed] + broke[:n_broke] or harm[:2]
    chosen = [(b, a, f"{verdict(b)} -> {verdict(a)}") for b, a in picked]
    ben = [(b, a) for b, a in pairs if b.get("split") == EVAL_BENIGN_SPLIT]
    ben.sort(key=lambda ba: bool(ba[0].get("refusal")) == bool(ba[1].get("refusal")))
    for b, a in ben[:benign]:
        r_b = "refused" if b.get("refusal") else "answered"
        r_a = "refused" if a.get("refusal") else "answered"
        chosen.append((b, a, f"benign: {r_b} -> {r_a}"))
    return [
        {
            "id": b["id"],
            "split": b.get("split"),
            "category": b.get("category"),
            "change": change,
            "prompt": b.get("text", ""),
            "before": {
                "policy": first,
                "response": b.get("response", ""),
                "safety": b.get("safety"),
            },
            "after": {"policy": last, "response": a.get("response", ""), "safety": a.get("safety")},
        }
        for b, a, change in chosen
    ]
