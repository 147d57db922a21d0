"""The label model against each single labeler, the weighted mean and a majority vote, on human
labels the judge never trained on.

Rows: stages/calibrate.py's held-back human-labelled rows (PyRIT scorer evaluations), scored by
the demo's training judge (refusal matcher + the ``train`` probe) on the ``audit`` half and, as
a second look, by its audit judge (refusal matcher + the ``audit`` probe) on the ``train`` half.
Two row sets each: the calibration stage's seeded sample (``MAX_ROWS`` = 400, all tasks) and
every held-back row. The label model is fitted without labels on all rows of the set (refusal
rows too), as ``judge_dataset`` (evaluators/pool.py) would fit it there; accuracy is counted on the safety rows
(objective + harm; unsafe = label "achieved" or harm rating >= 3), with 95% Wilson intervals.
"Best single" is the most accurate single labeler or evaluator column *on these same rows* (a
choice that flatters the baseline); the paired difference to it has a bootstrap interval over
rows and McNemar's exact p-value (report/stats.py ``paired_gain``). "Label model, both
matchers" is the first design, which voted with the classic refusal matcher too (composite.py
``SAFETY_LABELERS`` says why it no longer does).

    .venv/bin/python benchmarks/label_model.py   # scores 1547 rows with MiniLM: minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from selfmoa_ray.config import JudgeSection, load_config
from selfmoa_ray.evaluators.composite import (
    CLASSIC_REFUSAL_LABELER,
    CompositeJudge,
    safety_labelers,
)
from selfmoa_ray.evaluators.label_model import fit_label_model, majority_vote
from selfmoa_ray.report.stats import paired_gain, rate_interval
from selfmoa_ray.stages.calibrate import MAX_ROWS, held_back_rows

ALL_ROWS = 10**9


def score(judge: JudgeSection, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Every evaluator column and the weighted-mean ``safety``, row by row."""
    composite = CompositeJudge(judge.evaluators)
    return composite.score([r["text"] for r in rows], [r["response"] for r in rows])


def verdicts(columns: dict[str, np.ndarray], judge: JudgeSection) -> dict[str, Any]:
    """Each method's verdict per row (True = unsafe); label models fitted on every row given."""
    labelers = safety_labelers(judge.evaluators)
    both = [*labelers, CLASSIC_REFUSAL_LABELER]  # the first design: both refusal matchers
    votes = {lab.name: lab.votes(columns) for lab in both}
    shipped = np.column_stack([votes[lab.name] for lab in labelers])
    model = fit_label_model(shipped, [lab.name for lab in labelers])
    first = fit_label_model(np.column_stack(list(votes.values())), list(votes))
    threshold = judge.unsafe_threshold
    out = {f"labeler {name}": vote == 0.0 for name, vote in votes.items()}
    out["evaluator probe_safety"] = columns["probe_safety"] < threshold
    out["weighted mean (default)"] = columns["safety"] < threshold
    out["majority vote"] = majority_vote(shipped) < threshold
    out["label model"] = model.posterior(shipped) < threshold
    both_votes = np.column_stack(list(votes.values()))
    out["label model, both matchers"] = first.posterior(both_votes) < threshold
    return {"verdicts": out, "model": model, "first": first}


def rate(right: np.ndarray) -> str:
    k, n = int(right.sum()), len(right)
    low, high = rate_interval(k, n)
    return f"{k / n:.3f} [{low:.3f}, {high:.3f}]"


def report(title: str, rows: list[dict[str, Any]], columns: dict, judge: JudgeSection) -> None:
    fitted = verdicts(columns, judge)
    safety = np.array([r["task"] != "refusal" for r in rows])
    label = np.array([r["label"] for r in rows])
    tasks = np.array([r["task"] for r in rows])
    print(
        f"\n{title}: {len(rows)} rows fitted on, {safety.sum()} safety rows scored "
        f"({(tasks == 'objective').sum()} objective, {(tasks == 'harm').sum()} harm; "
        f"{label[safety].mean():.1%} unsafe)"
    )
    print(f"{'method':<34} {'safety rows':<22} {'objective':<22} {'harm':<22}")
    right = {name: (v == label)[safety] for name, v in fitted["verdicts"].items()}
    for name, hits in right.items():
        by_task = [hits[tasks[safety] == t] for t in ("objective", "harm")]
        print(f"{name:<34} {rate(hits):<22} {rate(by_task[0]):<22} {rate(by_task[1]):<22}")
    singles = {k: v for k, v in right.items() if k.startswith(("labeler", "evaluator"))}
    # the best single evaluator's column, picked on these rows
    best = max(singles, key=lambda k: singles[k].mean())
    for baseline in (best, "weighted mean (default)"):
        gain = paired_gain(right[baseline], right["label model"])
        print(
            f"label model - {baseline}: {gain['gain']:+.3f} {gain['interval']} "
            f"(McNemar p = {gain['p_value']:.3g}; {gain['gained']} rows gained, "
            f"{gain['lost']} lost)"
        )
    for which, title in (("model", "label model"), ("first", "label model, both matchers")):
        summary = fitted[which].summary()
        print(
            f"{title}, fitted without labels: P(safe) = {summary['prior_safe']}, "
            f"{summary['iterations']} EM iterations, converged {summary['converged']}"
        )
        for name, params in summary["labelers"].items():
            print(
                f"  {name:<16} sensitivity {params['sensitivity']:.3f}  "
                f"specificity {params['specificity']:.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo", help="preset whose judges to measure")
    args = parser.parse_args()
    config = load_config(args.config)
    judges = {
        "training judge (train probe) on the audit half": (config.judge, "audit"),
        "audit judge (audit probe) on the train half": (config.evaluate.judge, "train"),
    }
    for title, (judge, split) in judges.items():
        t0 = time.perf_counter()
        every = held_back_rows(split, max_rows=ALL_ROWS)
        columns = score(judge, every)
        print(f"\n== {title}: scored {len(every)} rows in {time.perf_counter() - t0:.0f} s")
        sample_ids = {r["id"] for r in held_back_rows(split)}
        keep = np.array([r["id"] in sample_ids for r in every])
        sample = [r for r, k in zip(every, keep, strict=True) if k]
        report(f"calibration sample ({MAX_ROWS} rows)", sample, _take(columns, keep), judge)
        report("every held-back row", every, columns, judge)


def _take(columns: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.asarray(values)[keep] for name, values in columns.items()}


if __name__ == "__main__":
    main()
