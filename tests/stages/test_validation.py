"""The validation prompts: seeded, balanced, and never a held-out evaluation prompt."""

import pyarrow.parquet as pq

from selfmoa_ray.config import load_config
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.sources.prompts import load_prompts
from selfmoa_ray.stages.validation import (
    ATTACK,
    BENIGN,
    read_validation,
    validation,
    validation_rows,
)


def test_rows_are_seeded_balanced_and_kept_off_the_evaluation_sets():
    config = load_config("demo", ["loop.validation_prompts=32"])
    rows = validation_rows(config)
    attacks = [r for r in rows if r["split"] == ATTACK]
    benign = [r for r in rows if r["split"] == BENIGN]
    assert len(attacks) == len(benign) == 32
    assert len({r["text"] for r in rows}) == 64 and len({r["id"] for r in rows}) == 64
    held_out = {
        r.text for spec in [*config.data.eval_harmful, *config.data.eval_benign]
        for r in load_prompts(spec)
    }  # fmt: skip
    assert not held_out & {r["text"] for r in rows}
    seeds = {r.id for spec in config.data.seeds for r in load_prompts(spec)}
    assert {r["seed_id"] for r in attacks} <= seeds
    assert validation_rows(config) == rows  # the same run seed draws the same prompts
    other = load_config("demo", ["loop.validation_prompts=32", "run.seed=1"])
    assert validation_rows(other) != rows


def test_the_stage_writes_the_file_training_reads(tmp_path):
    config = load_config("tiny", ["loop.validation_prompts=3"])
    run = RunDir.create(tmp_path / "run", config)
    assert read_validation(run) is None
    entry = validation(run, config)
    assert entry["summary"] == {"attacks": 3, "benign": 3}
    texts = read_validation(run)
    table = pq.read_table(run.path("validation.parquet")).to_pylist()
    assert texts == {
        "attacks": [r["text"] for r in table if r["split"] == ATTACK],
        "benign": [r["text"] for r in table if r["split"] == BENIGN],
    }
