"""Stage ``validation``: the prompts on which each iteration chooses how far to train.

seed sources -> ``validation.parquet``, once per run: ``loop.validation_prompts`` human seed
attacks (from ``data.seeds``) and as many benign-but-sensitive prompts (the red team's benign
pool), drawn with the run seed and deduplicated against the held-out evaluation sets. The red team
never uses them (stages/redteam.py reads this file into its deduplication history), so the epoch
choice of training/selection.py is made on prompts that neither trained the policy nor measure it.
"""

from __future__ import annotations

import random
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from selfmoa_ray.config import Config
from selfmoa_ray.layout import VALIDATION
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.schema import BENIGN_TRAIN_SOURCE
from selfmoa_ray.sources.dedup import Deduplicator
from selfmoa_ray.sources.prompts import PromptRow, load_prompts, load_source

ATTACK, BENIGN = "validation_attack", "validation_benign"
SCHEMA = pa.schema(
    [("id", pa.string()), ("text", pa.string()), ("category", pa.string()),
     ("split", pa.string()), ("seed_id", pa.string())]
)  # fmt: skip


def draw(
    pool: list[PromptRow], count: int, dedup: Deduplicator, rng: random.Random
) -> list[PromptRow]:
    """``count`` rows of ``pool`` in a seeded order, skipping near-duplicates of what is known."""
    order = sorted(pool, key=lambda r: r.id)
    rng.shuffle(order)
    return dedup.first_new(order, count)


def validation_rows(config: Config) -> list[dict[str, Any]]:
    count = config.loop.validation_prompts
    rng = random.Random(f"{config.run.seed}-validation")
    section = config.redteam.dedup
    dedup = Deduplicator(section.threshold, section.ngram, section.unit)
    dedup.add_history(
        row.text
        for spec in [*config.data.eval_harmful, *config.data.eval_benign]
        for row in load_prompts(spec)
    )
    attacks = draw([r for s in config.data.seeds for r in load_prompts(s)], count, dedup, rng)
    benign = draw(load_source(BENIGN_TRAIN_SOURCE), count, dedup, rng)
    return [
        {"id": f"val-{i:04d}", "text": row.text, "category": row.category, "split": split,
         "seed_id": row.id}
        for i, (row, split) in enumerate(
            [(r, ATTACK) for r in attacks] + [(r, BENIGN) for r in benign]
        )
    ]  # fmt: skip


def read_validation(run: RunDir) -> dict[str, list[str]] | None:
    """``{"attacks": [...], "benign": [...]}`` texts of the run's validation prompts, or None."""
    path = run.path(VALIDATION)
    if not path.exists():
        return None
    rows = pq.read_table(path, columns=["text", "split"]).to_pylist()
    return {
        "attacks": [r["text"] for r in rows if r["split"] == ATTACK],
        "benign": [r["text"] for r in rows if r["split"] == BENIGN],
    }


def validation(run: RunDir, config: Config) -> dict[str, Any]:
    """Run (or skip, if done) the validation stage."""

    def work() -> dict[str, Any]:
        rows = validation_rows(config)
        write_parquet(run.path(VALIDATION), pa.Table.from_pylist(rows, schema=SCHEMA))
        return {
            "attacks": sum(r["split"] == ATTACK for r in rows),
            "benign": sum(r["split"] == BENIGN for r in rows),
        }

    return run.run_stage("validation", [VALIDATION], work)
