"""Completion mode: a raw ``prompt`` row is continued as is, with no chat template."""

import numpy as np
import pyarrow as pa
import pytest

from selfmoa_ray.config import EngineSection, ModelSection
from selfmoa_ray.engines.base import SamplingParams, prompt_text
from selfmoa_ray.engines.endpoint import EndpointError, fan_out
from selfmoa_ray.engines.hf import HFChatEngine
from selfmoa_ray.engines.pool import chat_contents, complete

LIST = "Requests about locks:\n1. How do I pick a lock?\n2. How do I open a safe?\n3."


@pytest.fixture(scope="module")
def greedy():
    return HFChatEngine("tiny-random", SamplingParams(n=1, temperature=0.0, max_new_tokens=6))


def test_raw_prompt_is_tokenised_as_is_not_through_the_chat_template(greedy):
    tok = greedy.tokenizer
    raw_ids = tok(prompt_text({"id": "r", "prompt": LIST}, tok), add_special_tokens=False)
    chat_ids = tok.apply_chat_template(
        [{"role": "user", "content": LIST}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert raw_ids["input_ids"] == tok(LIST, add_special_tokens=False)["input_ids"]
    assert len(chat_ids) > len(raw_ids["input_ids"]) + 3  # the template's role markers
    out = greedy({"id": np.array(["r", "c"]), "prompt": np.array([LIST, None], dtype=object),
                  "text": np.array([None, LIST], dtype=object)})  # fmt: skip
    assert list(out["prompt_tokens"]) == [len(raw_ids["input_ids"]), len(chat_ids)]


def test_a_raw_prompt_holding_the_template_answers_like_the_chat(greedy):
    """The template's own text sent raw is the chat row exactly: same tokens, same answer."""
    templated = greedy.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, tokenize=False
    )
    chat = greedy({"id": np.array(["c"]), "text": np.array(["Hello there"])})
    raw = greedy({"id": np.array(["r"]), "prompt": np.array([templated])})
    for key in ("prompt_tokens", "response", "response_tokens"):
        assert raw[key][0] == chat[key][0], key


def test_pool_complete_mixes_chats_and_raw_prompts(ray_local, greedy):
    """Through the actor pool, a chat and a raw prompt in one call answer as the engine does."""
    sampling = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    model, engine = ModelSection(source="tiny-random"), EngineSection(num_cpus_per_actor=0.5)
    both = complete({"c": [{"role": "user", "content": "Hello there"}], "r": LIST},
                    model, engine, sampling)  # fmt: skip
    alone = greedy({"id": np.array(["c", "r"]), "text": np.array(["Hello there", None], object),
                    "prompt": np.array([None, LIST], object)})  # fmt: skip
    assert both == dict(zip(alone["id"], alone["response"], strict=True))
    assert both.tokens == sum(alone["response_tokens"]) > 0
    assert both.cut == {i for i, r in zip(alone["id"], alone["finish_reason"], strict=True)
                        if r == "length"}  # fmt: skip


def test_chat_contents_reads_the_raw_prompt():
    table = pa.table({"id": ["a", "b"], "prompt": [LIST, None], "text": [None, "hi"]})
    assert chat_contents(table) == [[LIST], ["hi"]]


def test_an_endpoint_refuses_raw_prompts_by_name():
    row = {"id": "x1", "prompt": LIST}
    with pytest.raises(EndpointError, match="x1.*chat only"):
        list(fan_out(row, model="m", sampling=SamplingParams()))
