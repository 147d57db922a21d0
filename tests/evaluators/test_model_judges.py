"""The reward model and the rubric judge run on the tiny model here (real GPUs use real ones)."""

import math

import numpy as np
import pytest

from selfmoa_ray.evaluators.reward_model import RewardModelEvaluator
from selfmoa_ray.evaluators.rubric import RubricJudge, parse_score


def test_reward_model_scores_in_range_and_depend_on_the_response():
    rm = RewardModelEvaluator("tiny-random", batch_size=2)
    out = rm.score(["Name a fruit."] * 3, ["Apple.", "A banana is a fruit.", "No."])
    assert out["reward_model_helpfulness"].shape == (3,)
    assert np.all((out["reward_model_helpfulness"] > 0) & (out["reward_model_helpfulness"] < 1))
    assert len(set(out["reward_model_logit"].round(6))) == 3
    # batching must not change a row's score (right padding, last real token read)
    single = rm.score(["Name a fruit."], ["No."])["reward_model_logit"][0]
    assert single == pytest.approx(out["reward_model_logit"][2], abs=1e-4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Score: 7", 7.0), ("score=10.", 10.0), ("I would say 3 out of 10", 3.0), ("Score: 0", math.nan),
     ("no idea", math.nan)],
)  # fmt: skip
def test_parse_score(text, expected):
    got = parse_score(text)
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


def test_rubric_template_must_have_both_slots(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("Rate {prompt}")
    with pytest.raises(ValueError, match="needs both"):
        RubricJudge("tiny-random", template=str(bad))
    bad.write_text("Rate {prompt} {response} {extra}")
    with pytest.raises(ValueError, match="other than"):
        RubricJudge("tiny-random", template=str(bad))


def test_rubric_runs_and_reports_unparsed_as_nan():
    out = RubricJudge("tiny-random").score(["Name a fruit.", "Hi"], ["Apple.", "Hello!"])
    values = out["rubric_helpfulness"]
    assert values.shape == (2,)
    assert all(math.isnan(v) or 0 <= v <= 1 for v in values)
