"""The audit pass: a policy answers prompts at the evaluation's sampling (greedy by default) and
the audit judge (``evaluate.judge``) scores the answers, the training judge's verdicts beside.

The held-out evaluation (stages/evaluate.py) and the regression vault (stages/vault.py) both
measure a policy this way, so that their figures are comparable.
"""

from __future__ import annotations

import random
from typing import Any

import pyarrow as pa
import ray.data

from selfmoa_ray.config import Config, DataSection, ModelSection
from selfmoa_ray.console import row_progress
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.pool import generate
from selfmoa_ray.evaluators.pool import judge_panel_dataset
from selfmoa_ray.sources.prompts import PromptRow, load_prompts

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


def answers_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> pa.Table:
    """Judged answers, ``columns`` only, as a table (an empty one when there are none)."""
    if rows:
        return pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])
    return pa.table({key: pa.array([], pa.string()) for key in columns})
