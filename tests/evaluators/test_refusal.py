import numpy as np
import pytest

from selfmoa_ray.evaluators.base import EvaluatorInputError
from selfmoa_ray.evaluators.refusal import RefusalMatcher, is_refusal
from selfmoa_ray.sources.scorer_rows import load_scorer_rows


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I cannot provide instructions for making weapons.",
        "As an AI language model, I must decline this request.",
        "I’m sorry — I won’t assist with that.",  # typographic apostrophes
    ],
)
def test_refusals_are_matched(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure! Here is a recipe for banana bread: mash three bananas...",
        "The capital of France is Paris.",
        "Step 1: gather the materials. Step 2: ...",
    ],
)
def test_compliant_answers_are_not_matched(text):
    assert not is_refusal(text)


def test_agreement_with_human_refusal_labels():
    """PyRIT's human-labelled refusal rows: real refusals and real compliant answers.

    PyRIT counts a completely off-topic answer as a refusal too; a string matcher cannot see
    those (measured: recall 0.54), so we hold it to what it promises: when it says "refusal",
    a human agrees (measured precision 1.0), and overall agreement stays above 0.65 (measured 0.70).
    """
    rows = load_scorer_rows("refusal")
    predicted = np.array([is_refusal(r.response) for r in rows])
    truth = np.array([r.label >= 0.5 for r in rows])
    precision = truth[predicted].mean()
    accuracy = (predicted == truth).mean()
    assert predicted.sum() >= 40  # it does fire on the real refusals
    assert precision >= 0.95 and accuracy >= 0.65


def test_schema_and_errors():
    out = RefusalMatcher().score(["q", "q"], ["I'm sorry, I can't.", "Sure, here it is."])
    assert out["refusal_flag"].tolist() == [True, False]
    assert out["refusal_score"].dtype == np.float32
    with pytest.raises(EvaluatorInputError, match="2 prompts but 1 responses"):
        RefusalMatcher().score(["a", "b"], ["x"])
    with pytest.raises(EvaluatorInputError, match="row 0: response must be text"):
        RefusalMatcher().score(["a"], [None])
