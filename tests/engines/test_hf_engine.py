"""Contract tests for the transformers engine, direct and through a real Ray Data actor pool."""

import numpy as np
import pytest
import ray.data

from selfmoa_ray.config import EngineSection, ModelSection
from selfmoa_ray.engines.base import OUTPUT_COLUMNS, SamplingParams
from selfmoa_ray.engines.hf import HFChatEngine
from selfmoa_ray.engines.pool import generate

PROMPTS = {
    "id": np.array(["p1", "p2", "p3"]),
    "text": np.array(["Hi there", "2+2?", "Tell a joke"]),
}


@pytest.fixture(scope="module")
def engine():
    return HFChatEngine("tiny-random", SamplingParams(n=3, temperature=1.0, max_new_tokens=5))


def test_n_samples_per_prompt_and_schema(engine):
    out = engine(dict(PROMPTS))
    assert set(out) == {"id", "text", *OUTPUT_COLUMNS}
    assert list(out["id"]) == ["p1"] * 3 + ["p2"] * 3 + ["p3"] * 3
    assert list(out["sample_index"]) == [0, 1, 2] * 3
    assert all(0 < t <= 5 for t in out["response_tokens"])
    assert set(out["finish_reason"]) <= {"stop", "length"}


def test_max_new_tokens_is_respected(engine):
    out = engine(dict(PROMPTS))
    for tokens, reason in zip(out["response_tokens"], out["finish_reason"], strict=True):
        assert tokens <= 5
        assert reason == "stop" or tokens == 5  # "length" means the budget was used up
    longer = HFChatEngine("tiny-random", SamplingParams(n=3, temperature=1.0, max_new_tokens=12))
    assert sum(longer(dict(PROMPTS))["response_tokens"]) > sum(out["response_tokens"])


def test_greedy_is_deterministic_and_seeded_sampling_repeats(engine):
    greedy = HFChatEngine("tiny-random", SamplingParams(n=2, temperature=0.0, max_new_tokens=6))
    out = greedy(dict(PROMPTS))
    assert out["response"][0] == out["response"][1]  # greedy: every sample equal
    assert list(greedy(dict(PROMPTS))["response"]) == list(out["response"])
    first, second = engine(dict(PROMPTS)), engine(dict(PROMPTS))
    assert list(first["response"]) == list(second["response"])  # same seed, same samples


def test_chat_template_is_applied(engine):
    text = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>user\nHi there<|im_end|>" in text and text.endswith(
        "<|im_start|>assistant\n"
    )
    out = engine(dict(PROMPTS))
    prompt_tokens = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert out["prompt_tokens"][0] == prompt_tokens


def test_messages_column_overrides_text(engine):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    batch = {
        "id": np.array(["m"]),
        "text": np.array([""]),
        "messages": np.array([chat], dtype=object),
    }
    out = engine(batch)
    system = "<|im_start|>system\nBe brief.<|im_end|>"
    templated = engine.tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False
    )
    assert system in templated
    assert out["prompt_tokens"][0] == len(
        engine.tokenizer(templated, add_special_tokens=False)["input_ids"]
    )


def test_actor_pool_streams_rows(ray_local):
    rows = [{"id": f"p{i}", "text": f"Question {i}?"} for i in range(10)]
    ds = generate(
        ray.data.from_items(rows),
        ModelSection(source="tiny-random"),
        EngineSection(batch_size=4, num_cpus_per_actor=0.5),
        SamplingParams(n=2, temperature=0.7, max_new_tokens=4),
    )
    out = ds.take_all()
    assert len(out) == 20
    assert sorted({r["id"] for r in out}) == sorted(r["id"] for r in rows)
    assert all(isinstance(r["response"], str) for r in out)
