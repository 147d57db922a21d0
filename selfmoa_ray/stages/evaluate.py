"""Stage ``evaluate``: a policy answers the held-out harmful and benign sets; the judge scores them.

Greedy decoding by default, so two policies are compared on the same footing. Evaluation sets come
from ``data.eval_harmful`` / ``data.eval_benign`` and are never used for training (config.py checks).
The answers are scored by the audit judge (``evaluate.judge``), which shares no training data with
the training judge; the training judge scores them too, so the report shows how far they agree.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray.data

from selfmoa_ray.config import Config, DataSection, ModelSection
from selfmoa_ray.console import row_progress
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.pool import generate
from selfmoa_ray.report.metrics import summarize
from selfmoa_ray.rundir import RunDir, write_json, write_parquet
from selfmoa_ray.sources.prompts import PromptRow, load_prompts
from selfmoa_ray.stages.judge import judge_panel_dataset

TRAINING_JUDGE = "training_judge_"  # prefix of the training judge's verdicts on held-out answers


def held_out_prompts(data: DataSection, seed: int) -> list[PromptRow]:
    """The evaluation prompts, each set capped at ``max_eval_prompts`` by a seeded sample."""
    rows: list[PromptRow] = []
    for spec in [*data.eval_harmful, *data.eval_benign, *data.eval_files]:
        items = load_prompts(spec)
        if data.max_eval_prompts and len(items) > data.max_eval_prompts:
            items = random.Random(seed).sample(items, data.max_eval_prompts)
        rows.extend(items)
    return rows


def answer_and_judge(
    prompts: list[dict[str, Any]], config: Config, model: ModelSection, label: str
) -> list[dict[str, Any]]:
    """``model``'s answers to ``prompts`` (rows with ``id``, ``text``...) at the evaluation's
    sampling (greedy by default), judged by the audit judge (``evaluate.judge``), with the
    training judge's verdicts beside (``training_judge_safety``, ...: how far the two agree);
    sorted by prompt id. ``label`` names the progress bar."""
    sampling = SamplingParams(
        n=1,
        temperature=config.evaluate.temperature,
        max_new_tokens=config.evaluate.max_new_tokens,
        seed=config.run.seed,
    )
    # Every row with every key (None where it has none): a block's columns are its first row's.
    keys = list(dict.fromkeys(key for row in prompts for key in row))
    ds = ray.data.from_items([{key: row.get(key) for key in keys} for row in prompts])
    ds = generate(ds, model, config.engine, sampling)
    judges = [(config.judge, TRAINING_JUDGE), (config.evaluate.judge, None)]
    ds = judge_panel_dataset(ds, judges, model.dtype)
    rows: list[dict[str, Any]] = []
    with row_progress(label, len(prompts), tokens=True) as advance:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            rows.extend(batch.to_pylist())
            advance(batch)
    rows.sort(key=lambda r: (r["id"], r["sample_index"]))
    return rows


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


def answers_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> pa.Table:
    """Judged answers, ``columns`` only, as a table (an empty one when there are none)."""
    if rows:
        return pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])
    return pa.table({key: pa.array([], pa.string()) for key in columns})
