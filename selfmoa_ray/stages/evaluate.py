"""Stage ``evaluate``: a policy answers the held-out harmful and benign sets; the judge scores them.

Greedy decoding by default, so two policies are compared on the same footing. Evaluation sets come
from ``data.eval_harmful`` / ``data.eval_benign`` and are never used for training (config.py checks).
The answers are scored by the audit judge (``evaluate.judge``), which shares no training data with
the training judge; the training judge scores them too, so the report shows how far they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from selfmoa_ray.config import Config, ModelSection
from selfmoa_ray.evaluators.audit import answer_and_judge, answers_table, held_out_prompts
from selfmoa_ray.report.metrics import summarize
from selfmoa_ray.rundir import RunDir, write_json, write_parquet


@dataclass(frozen=True)
class AlsoAnswer:
    """Prompts a later stage needs answered and judged like the held-out ones (the regression
    vault, stages/vault.py), answered in the evaluation's own pass: one engine and one judge
    start instead of two (the vault's own pass cost ~28 s, nearly all of it starting up). Their
    judged rows, ``columns`` only, go to ``out`` (run-relative), never into the held-out figures.
    ``rows`` carry a ``split`` of their own, which no held-out set uses."""

    rows: list[dict[str, Any]]
    out: str
    columns: tuple[str, ...]


def evaluate_policy(
    run: RunDir, config: Config, model: ModelSection, name: str, *, also: AlsoAnswer | None = None
) -> dict[str, Any]:
    """Run (or skip, if done) the evaluation of ``model``; outputs go under ``<name>/``, and
    ``also``'s answers to ``also.out``."""
    responses, metrics = f"{name}/eval_responses.parquet", f"{name}/metrics.json"

    def work() -> dict[str, Any]:
        prompts = [p.to_dict() for p in held_out_prompts(config.data, config.run.seed)]
        extra = also.rows if also else []
        rows = answer_and_judge(prompts + extra, config, model, f"{name}/evaluate")
        if also:
            splits = {row["split"] for row in extra}
            answered = [row for row in rows if row["split"] in splits]
            write_parquet(run.path(also.out), answers_table(answered, also.columns))
            rows = [row for row in rows if row["split"] not in splits]
        write_parquet(run.path(responses), pa.Table.from_pylist(rows))
        summary = {
            "model": model.label,
            "judge": "evaluate.judge (audit)",
            "splits": summarize(
                rows,
                config.evaluate.judge.unsafe_threshold,
                training_threshold=config.judge.unsafe_threshold,
            ),
        }
        write_json(run.path(metrics), summary)
        return summary

    outputs = [responses, metrics, *([also.out] if also else [])]
    return run.run_stage(f"{name}/evaluate", outputs, work)
