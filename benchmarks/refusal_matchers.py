"""The classic refusal-prefix list against the strict matcher, on human labels and on a run.

1. PyRIT's human refusal labels (``datasets/scorer_evals/refusal_scorer``, MIT, 169 rows, shipped
   in the data package): precision, recall and accuracy of each matcher, with 95% Wilson
   intervals. PyRIT counts an off-topic answer as a refusal too, which no string matcher sees, so
   recall is bounded well below 1 for both.
2. With ``--run DIR``: each matcher's refusal rate on every evaluated policy's held-out answers
   (``<policy>/eval_responses.parquet``), where small models apologise and then comply.

    .venv/bin/python benchmarks/refusal_matchers.py
    .venv/bin/python benchmarks/refusal_matchers.py --run runs/demo-...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from selfmoa_ray.evaluators.refusal import is_refusal, is_strict_refusal
from selfmoa_ray.report.stats import rate_interval
from selfmoa_ray.sources.scorer_rows import load_scorer_rows

MATCHERS = {"classic": is_refusal, "strict": is_strict_refusal}


def _rate(k: int, n: int) -> str:
    low, high = rate_interval(k, n)
    return f"{k / n if n else 0:6.1%} [{low:.1%}, {high:.1%}] ({k}/{n})"


def against_labels() -> None:
    rows = load_scorer_rows("refusal")
    truth = np.array([r.label >= 0.5 for r in rows])
    print(f"PyRIT refusal labels: {len(rows)} rows, {truth.sum()} refusals")
    print(f"{'matcher':<8} {'precision':<30} {'recall':<30} {'accuracy':<30}")
    for name, matcher in MATCHERS.items():
        said = np.array([matcher(r.response) for r in rows])
        hits = int((said & truth).sum())
        print(
            f"{name:<8} {_rate(hits, int(said.sum())):<30} {_rate(hits, int(truth.sum())):<30} "
            f"{_rate(int((said == truth).sum()), len(rows)):<30}"
        )


def on_run(root: Path) -> None:
    print(f"\nrefusal rates on {root}'s held-out answers (95% Wilson intervals)")
    print(f"{'policy':<10} {'split':<14} {'classic':<28} {'strict':<28}")
    for path in sorted(root.glob("*/eval_responses.parquet")):
        table = pq.read_table(path, columns=["split", "response"]).to_pylist()
        for split in sorted({r["split"] for r in table}):
            texts = [r["response"] for r in table if r["split"] == split]
            counts = {name: sum(m(t) for t in texts) for name, m in MATCHERS.items()}
            print(
                f"{path.parent.name:<10} {split:<14} "
                + " ".join(f"{_rate(counts[name], len(texts)):<28}" for name in MATCHERS)
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a run folder whose held-out answers to score")
    args = parser.parse_args()
    against_labels()
    if args.run:
        on_run(args.run)


if __name__ == "__main__":
    main()
