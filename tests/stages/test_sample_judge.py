"""sample and judge as functions of run-directory files, on a real local Ray with the tiny model."""

import pyarrow.parquet as pq
import pytest

from selfmoa_ray.config import load_config
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.sources.prompts import load_source, rows_to_table
from selfmoa_ray.stages.judge import judge
from selfmoa_ray.stages.sample import sample


@pytest.fixture
def run_with_prompts(tmp_path):
    config = load_config("tiny")
    run = RunDir.create(tmp_path / "run", config)
    prompts = load_source("advbench")[:5] + load_source("benign_train")[:3]
    write_parquet(run.path("iter_01/prompts.parquet"), rows_to_table(prompts))
    return run, config, prompts


def test_sample_then_judge(run_with_prompts, ray_local):
    run, config, prompts = run_with_prompts
    entry = sample(
        run, stage="iter_01/sample", prompts="iter_01/prompts.parquet",
        out="iter_01/responses.parquet", model=config.policy, engine=config.engine,
        sampling=SamplingParams(n=3, temperature=0.8, max_new_tokens=6),
    )  # fmt: skip
    responses = pq.read_table(run.path("iter_01/responses.parquet")).to_pylist()
    assert entry["summary"]["responses"] == len(responses) == 3 * len(prompts)
    by_id = {}
    for row in responses:
        by_id.setdefault(row["id"], []).append(row["sample_index"])
    assert {p.id for p in prompts} == set(by_id)
    assert all(sorted(v) == [0, 1, 2] for v in by_id.values())

    entry = judge(
        run, stage="iter_01/judge", responses="iter_01/responses.parquet",
        out="iter_01/scored.parquet", config=config.judge,
    )  # fmt: skip
    scored = pq.read_table(run.path("iter_01/scored.parquet")).to_pylist()
    assert len(scored) == len(responses) and entry["summary"]["rows"] == len(scored)
    for row in scored:
        assert 0 <= row["safety"] <= 1 and 0 <= row["helpfulness"] <= 1
        assert isinstance(row["refusal"], bool) and isinstance(row["refusal_flag"], bool)

    # Both stages are recorded as done and are skipped on a rerun.
    again = RunDir.open(run.root)
    assert again.is_done("iter_01/sample") and again.is_done("iter_01/judge")
    assert judge(again, stage="iter_01/judge", responses="x", out="iter_01/scored.parquet",
                 config=config.judge)["attempts"] == 1  # fmt: skip


def test_a_failed_stage_publishes_nothing(run_with_prompts, ray_local):
    run, config, _ = run_with_prompts
    with pytest.raises(Exception):  # noqa: B017 - whichever error Ray raises for a missing file
        sample(
            run, stage="iter_01/sample", prompts="iter_01/missing.parquet",
            out="iter_01/responses.parquet", model=config.policy, engine=config.engine,
            sampling=SamplingParams(n=1, max_new_tokens=2),
        )  # fmt: skip
    assert not run.path("iter_01/responses.parquet").exists()
    assert [p.name for p in run.path("iter_01").iterdir()] == ["prompts.parquet"]
    assert RunDir.open(run.root).stage_status("iter_01/sample") == "failed"
