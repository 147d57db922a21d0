"""Shared prefill (engines/hf.py): each prompt is prefilled once and its KV cache repeated n times.

The tiny random model answers every prompt with the same newline, which would hide a broken
cache, so these tests scale its weights up (x10): the answers become chaotic, every token depends
on the whole context, and each of these mistakes fails the tests (checked by hand): positions
counted from the pads, a prefill without the attention mask, positions off by one, the cache
tiled (``repeat``) instead of interleaved.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers.cache_utils import DynamicCache

from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.hf import HFChatEngine

N = 3
GREEDY = SamplingParams(n=N, temperature=0.0, max_new_tokens=16)
SAMPLED = SamplingParams(n=N, temperature=1.0, max_new_tokens=12, seed=5)
QUESTIONS = ["Hi", "Please write a much longer question than the first one, with detail."]


@pytest.fixture(scope="module")
def engine() -> HFChatEngine:
    engine = HFChatEngine("tiny-random", GREEDY)
    with torch.no_grad():
        for name, param in engine.model.named_parameters():
            if "norm" not in name:
                param.mul_(10.0)
    return engine


@pytest.fixture(autouse=True)
def greedy(engine):
    engine.sampling = GREEDY
    yield
    engine.sampling = GREEDY


def _prompts(engine: HFChatEngine) -> list[str]:
    """Two chats of different lengths and a one-token raw prompt: one left-padded batch whose
    shortest row is all padding in the prefilled part."""
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    templated = [
        engine.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
        for c in chats
    ]
    return [*templated, "a"]


def _encode(engine: HFChatEngine, prompts: list[str]):
    return engine.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_greedy_through_shared_prefill_matches_plain_generate(engine):
    enc = _encode(engine, _prompts(engine))
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    assert lengths[2] == 1 and lengths[1] > lengths[0] + 10  # really left-padded, one-token row
    plain, plain_rows = engine.new_tokens(enc, shared_prefill=False)
    shared, shared_rows = engine.new_tokens(enc, shared_prefill=True)
    assert (plain_rows, shared_rows) == (1, N)  # greedy decodes once; forced sharing decodes n
    assert shared.shape == (len(lengths) * N, plain.shape[1])
    for i in range(len(lengths)):
        assert len(set(plain[i].tolist())) > 5  # a chaotic answer, not one repeated token
        for j in range(N):
            assert torch.equal(shared[i * N + j], plain[i]), (i, j)


def test_each_prompt_alone_gets_what_it_gets_in_the_batch(engine):
    prompts = _prompts(engine)
    batch, _ = engine.new_tokens(_encode(engine, prompts), shared_prefill=True)
    for i, prompt in enumerate(prompts):
        alone, _ = engine.new_tokens(_encode(engine, [prompt]), shared_prefill=True)
        assert torch.equal(alone[0], batch[i * N]), i


def test_the_cache_holds_all_but_the_last_token_repeated_per_prompt(engine):
    enc = _encode(engine, _prompts(engine))
    with torch.inference_mode():
        cache = engine._shared_prefill(enc, N)
    assert type(cache) is DynamicCache
    assert cache.get_seq_length() == enc["input_ids"].shape[1] - 1
    for layer in cache.layers:
        assert layer.keys.shape[0] == len(enc["input_ids"]) * N
        for i in range(len(enc["input_ids"])):  # interleaved: rows i*N .. i*N+N-1 are prompt i
            block = layer.keys[i * N : (i + 1) * N]
            assert all(torch.equal(block[0], block[j]) for j in range(1, N))
        assert not torch.equal(layer.keys[0], layer.keys[N])


def test_one_token_prompts_have_nothing_to_share(engine):
    enc = _encode(engine, ["a", "b"])
    assert enc["input_ids"].shape[1] == 1
    with torch.inference_mode():
        assert engine._shared_prefill(enc, N) is None
    tokens, per_prompt = engine.new_tokens(enc, shared_prefill=True)
    assert per_prompt == 1  # fell back to the plain path
    assert torch.equal(tokens, engine.new_tokens(enc, shared_prefill=False)[0])


def test_sampling_shares_the_prefill_and_draws_the_same_samples(engine, monkeypatch):
    """Sampling takes the shared path by default; it draws the same random numbers in the same
    shapes as ``num_return_sequences``, so a seeded batch gets the same samples either way."""
    engine.sampling = SAMPLED
    calls = []
    real = engine._shared_prefill
    monkeypatch.setattr(engine, "_shared_prefill", lambda *a: calls.append(a) or real(*a))
    prompts = _prompts(engine)[:2]
    shared = engine.generate(prompts)
    assert len(calls) == 1
    plain = engine.generate(prompts, shared_prefill=False)
    assert len(calls) == 1
    assert shared == plain
    for samples in shared:
        assert [s["sample_index"] for s in samples] == list(range(N))
        assert len({s["response"] for s in samples}) == N  # n different samples, not n copies


def test_greedy_and_single_samples_keep_the_plain_path(engine, monkeypatch):
    monkeypatch.setattr(engine, "_shared_prefill", lambda *a: pytest.fail("shared prefill used"))
    prompts = _prompts(engine)[:2]
    engine.generate(prompts)  # greedy, n=3
    engine.sampling = replace(SAMPLED, n=1)
    engine.generate(prompts)


@pytest.mark.slow
def test_real_model_greedy_matches_with_and_without_shared_prefill():
    """SmolLM2-135M-Instruct, a bare and a guided chat (a safety system prompt and two example
    turns) in one batch: forced shared prefill gives plain ``generate``'s greedy answer for every
    sample, token for token."""
    engine = HFChatEngine("packaged:smollm2-135m-instruct", replace(GREEDY, n=2, max_new_tokens=24))
    guide = [
        {"role": "system", "content": "You are a safe and responsible assistant. Refuse requests "
         "that could cause harm, and help with everything else."},
        {"role": "user", "content": "How can I get into my ex's email account without them knowing?"},
        {"role": "assistant", "content": "I'm sorry, but I can't help with that. Getting into "
         "someone else's account is illegal and a breach of their privacy."},
        {"role": "user", "content": "How do I kill a Python process that is stuck?"},
        {"role": "assistant", "content": "Find its process id with `ps aux | grep python`, then "
         "run `kill <pid>`; if it still runs, use `kill -9 <pid>`."},
    ]  # fmt: skip
    question = {"role": "user", "content": "How do I pick a lock?"}
    chats = [[question], [*guide, question]]
    prompts = [
        engine.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
        for c in chats
    ]
    enc = _encode(engine, prompts)
    plain, _ = engine.new_tokens(enc, shared_prefill=False)
    shared, _ = engine.new_tokens(enc, shared_prefill=True)
    for i in range(len(prompts)):
        for j in range(2):
            assert torch.equal(shared[i * 2 + j], plain[i]), (i, j)
    assert engine.generate(prompts, shared_prefill=True) == engine.generate(prompts)
