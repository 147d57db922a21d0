import json

import pyarrow.parquet as pq

from selfmoa_ray.config import load_config
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.stages.evaluate import evaluate_policy, held_out_prompts


def test_held_out_sets_are_capped_and_seeded():
    config = load_config("tiny", ["data.max_eval_prompts=5"])
    first = held_out_prompts(config.data, seed=0)
    assert len(first) == 10
    assert {r.split for r in first} == {"eval_harmful", "eval_benign"}
    assert [r.id for r in held_out_prompts(config.data, seed=0)] == [r.id for r in first]
    assert [r.id for r in held_out_prompts(config.data, seed=1)] != [r.id for r in first]


def test_evaluate_stage_writes_metrics_and_resumes(tmp_path, ray_local):
    config = load_config("tiny", ["data.max_eval_prompts=4", "evaluate.max_new_tokens=4"])
    run = RunDir.create(tmp_path / "run", config)
    entry = evaluate_policy(run, config, config.policy, name="baseline")
    assert entry["status"] == "done"
    rows = pq.read_table(run.path("baseline/eval_responses.parquet")).to_pylist()
    assert len(rows) == 8 and all("refusal" in r for r in rows)
    metrics = json.loads(run.path("baseline/metrics.json").read_text())
    assert set(metrics["splits"]) == {"eval_harmful", "eval_benign"}
    assert metrics["splits"]["eval_harmful"]["responses"] == 4
    # A second call (e.g. after a restart) skips the finished stage.
    again = RunDir.create(tmp_path / "run", config, resume=True)
    assert evaluate_policy(again, config, config.policy, name="baseline")["attempts"] == 1
