"""sample and judge as functions of run-directory files, on a real local Ray with the tiny model."""

import pyarrow.parquet as pq
import pytest

from selfmoa_ray.config import load_config
from selfmoa_ray.engines.base import SamplingParams, join_prefill
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.sources.models import load_model_and_tokenizer
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


def test_guided_samples_answer_the_bare_prompt_under_the_guide(run_with_prompts, ray_local):
    run, config, prompts = run_with_prompts
    # Longer than the chat template's default system prompt, which a guide replaces.
    system = "You are a careful assistant. Refuse harmful requests and help with the rest. " * 4
    guide = [{"role": "system", "content": system}]
    entry = sample(
        run, stage="iter_01/sample", prompts="iter_01/prompts.parquet",
        out="iter_01/responses.parquet", model=config.policy, engine=config.engine,
        sampling=SamplingParams(n=2, temperature=0.8, max_new_tokens=4), guide=guide,
    )  # fmt: skip
    rows = pq.read_table(run.path("iter_01/responses.parquet")).to_pylist()
    assert entry["summary"]["responses"] == len(rows) == 4 * len(prompts)
    assert entry["summary"]["guided_responses"] == 2 * len(prompts)
    assert "messages" not in rows[0]  # downstream stages read the bare prompt in `text`
    texts = {p.id: p.text for p in prompts}
    by_id: dict[str, dict[int, dict]] = {}
    for row in rows:
        assert row["text"] == texts[row["id"]]
        by_id.setdefault(row["id"], {})[row["sample_index"]] = row
    for samples in by_id.values():
        assert sorted(samples) == [0, 1, 2, 3]
        assert [samples[i]["guided"] for i in range(4)] == [False, False, True, True]
        # The guide reached the model: the guided prompts are longer by the extra guide text.
        assert samples[2]["prompt_tokens"] == samples[3]["prompt_tokens"]
        assert samples[2]["prompt_tokens"] > samples[0]["prompt_tokens"] + 10


def test_prefilled_answers_open_with_the_prefill_and_the_model_writes_on(
    run_with_prompts, ray_local
):
    run, config, prompts = run_with_prompts
    prefill = "I'm sorry, but I can't"
    entry = sample(
        run, stage="iter_01/sample", prompts="iter_01/prompts.parquet",
        out="iter_01/responses.parquet", model=config.policy, engine=config.engine,
        sampling=SamplingParams(n=1, temperature=0.8, max_new_tokens=3), prefill=prefill,
    )  # fmt: skip
    rows = pq.read_table(run.path("iter_01/responses.parquet")).to_pylist()
    assert entry["summary"]["guided_responses"] == len(prompts) == len(rows) // 2
    prefill_tokens = len(load_model_and_tokenizer("tiny-random")[1](prefill)["input_ids"])
    for pid in {p.id for p in prompts}:
        bare, guided = sorted((r for r in rows if r["id"] == pid), key=lambda r: r["sample_index"])
        assert (bare["guided"], guided["guided"]) == (False, True)
        assert not bare["response"].startswith(prefill)
        # The stored answer is the prefill and what the model wrote after it, inside the opened
        # assistant turn (no new turn: the prompt grew by the prefill's tokens only).
        assert guided["response"].startswith(prefill) and len(guided["response"]) > len(prefill)
        continuation = guided["response"][len(prefill) :]
        assert continuation[0] == " " or not continuation[0].isalnum()
        assert guided["prompt_tokens"] == bare["prompt_tokens"] + prefill_tokens


def test_the_space_after_the_prefill_is_put_back():
    assert join_prefill("I'm sorry, but I can't", "help with that.") == (
        "I'm sorry, but I can't help with that."
    )
    assert join_prefill("I can't", ". Sorry.") == "I can't. Sorry."
    assert join_prefill("I can't ", "help") == "I can't help"
    assert join_prefill("I can't", "") == "I can't"
