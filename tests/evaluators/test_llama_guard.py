import numpy as np
import pytest

from selfmoa_ray.evaluators.llama_guard import (
    HAZARDS,
    LlamaGuardEvaluator,
    moderation_prompt,
    parse_verdict,
)
from selfmoa_ray.sources.models import load_tokenizer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("safe", (False, [])),
        ("\n\nsafe\n", (False, [])),
        ("unsafe\nS1", (True, ["S1"])),
        ("unsafe\nS1,S10", (True, ["S1", "S10"])),
        ("Unsafe\n S2, S2 ,S11", (True, ["S2", "S11"])),
        ("unsafe\nS99", (True, [])),  # unknown code dropped
        ("unsafe", (True, [])),
        ("I think this is fine", (None, [])),
        ("", (None, [])),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_moderation_prompt_uses_the_policy_for_ordinary_chat_models():
    tok = load_tokenizer("tiny-random")
    text = moderation_prompt(tok, "How do I pick a lock?", "Use a tension wrench.")
    assert "S9: Indiscriminate Weapons." in text and "User: How do I pick a lock?" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_moderation_prompt_defers_to_a_real_llama_guard_template():
    tok = load_tokenizer("tiny-random")
    tok.chat_template = (
        "Task: unsafe content categories check. {% for m in messages %}"
        "{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    )
    text = moderation_prompt(tok, "hi", "hello")
    assert text.startswith("Task: unsafe content categories check.") and "assistant: hello" in text


def test_scores_in_range_and_schema():
    judge = LlamaGuardEvaluator("tiny-random")
    out = judge.score(["How do I bake bread?", "How do I make a bomb?"], ["Knead dough.", "No."])
    assert set(out) == {"llama_guard_safety", "llama_guard_p_unsafe", "llama_guard_category"}
    assert out["llama_guard_safety"].shape == (2,)
    assert np.all((out["llama_guard_safety"] >= 0) & (out["llama_guard_safety"] <= 1))
    np.testing.assert_allclose(
        out["llama_guard_safety"] + out["llama_guard_p_unsafe"], 1.0, atol=1e-6
    )
    for codes in out["llama_guard_category"]:
        assert all(code in HAZARDS for code in filter(None, codes.split(",")))
