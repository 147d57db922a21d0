"""The Dawid-Skene label model: votes from a known model, abstains, degenerate input, and the
judge with ``combine: label_model`` on real rows through Ray Data."""

import numpy as np
import pyarrow as pa
import pytest
import ray.data
from pydantic import ValidationError

from selfmoa_ray.config import EvaluatorSection, JudgeSection
from selfmoa_ray.evaluators.composite import VOTE_PREFIX, CompositeJudge, safety_labelers
from selfmoa_ray.evaluators.label_model import (
    _posterior,
    check_votes,
    fit_label_model,
    majority_vote,
)
from selfmoa_ray.sources.scorer_rows import load_scorer_rows

PRIOR = 0.35
SENSITIVITY = np.array([0.95, 0.90, 0.70, 0.62, 0.60])  # P(vote safe | safe)
SPECIFICITY = np.array([0.92, 0.80, 0.75, 0.60, 0.64])  # P(vote unsafe | unsafe)


def draw(n: int, seed: int, abstain: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, votes) from a known Dawid-Skene model: 1 safe, 0 unsafe, NaN abstain."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < PRIOR
    u = rng.random((n, len(SENSITIVITY)))
    votes = np.where(truth[:, None], u < SENSITIVITY, u >= SPECIFICITY).astype(np.float64)
    votes[rng.random(votes.shape) < abstain] = np.nan
    return truth, votes


def accuracy(p_safe: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean((p_safe >= 0.5) == truth))


def test_recovers_known_accuracies_and_labels_and_beats_majority_vote():
    truth, votes = draw(6000, seed=0)
    model = fit_label_model(votes)
    assert model.converged
    assert abs(model.prior - PRIOR) < 0.02
    np.testing.assert_allclose(model.sensitivity, SENSITIVITY, atol=0.03)
    np.testing.assert_allclose(model.specificity, SPECIFICITY, atol=0.03)
    fitted = accuracy(model.posterior(votes), truth)
    bayes = accuracy(_posterior(votes, PRIOR, SENSITIVITY, SPECIFICITY), truth)  # true params
    voted = accuracy(majority_vote(votes), truth)
    assert fitted > bayes - 0.005  # as good as knowing the labelers
    assert fitted > voted + 0.03  # three weak labelers outvote two good ones in a plain vote


def test_fits_again_on_fresh_votes_from_the_same_model():
    truth, votes = draw(6000, seed=0)
    model = fit_label_model(votes)
    truth2, votes2 = draw(3000, seed=1)  # unseen rows scored with the fitted parameters
    assert accuracy(model.posterior(votes2), truth2) > accuracy(majority_vote(votes2), truth2)


def test_abstains_carry_no_evidence():
    truth, votes = draw(2000, seed=2, abstain=0.5)
    silent = np.c_[votes, np.full(len(votes), np.nan)]  # a labeler that never votes
    votes[:5] = silent[:5, :-1] = np.nan  # rows where every labeler abstains
    with_silent, without = fit_label_model(silent), fit_label_model(votes)
    assert with_silent.sensitivity[-1] == with_silent.specificity[-1] == 0.5
    np.testing.assert_allclose(with_silent.posterior(silent), without.posterior(votes))
    np.testing.assert_allclose(without.posterior(votes)[:5], without.prior)  # only the prior
    assert accuracy(without.posterior(votes)[5:], truth[5:]) > 0.8


@pytest.mark.parametrize("vote", [0.0, 1.0])
def test_all_agree_stays_finite_and_on_their_side(vote):
    votes = np.full((50, 4), vote)
    model = fit_label_model(votes)
    p = model.posterior(votes)
    assert np.all(np.isfinite(p)) and 0 < model.prior < 1
    assert np.all(model.sensitivity > 0) and np.all(model.sensitivity < 1)
    assert np.all(model.specificity > 0) and np.all(model.specificity < 1)
    assert np.all(p > 0.9) if vote else np.all(p < 0.1)


def test_swapping_every_vote_swaps_every_posterior():
    _, votes = draw(1500, seed=3)
    p = fit_label_model(votes).posterior(votes)
    np.testing.assert_allclose(fit_label_model(1.0 - votes).posterior(1.0 - votes), 1.0 - p)


def test_deterministic_and_independent_of_row_order():
    _, votes = draw(1500, seed=4)
    first, second = fit_label_model(votes), fit_label_model(votes)
    np.testing.assert_array_equal(first.posterior(votes), second.posterior(votes))
    order = np.random.default_rng(0).permutation(len(votes))
    shuffled = fit_label_model(votes[order])
    np.testing.assert_allclose(shuffled.posterior(votes), first.posterior(votes), atol=1e-9)


def test_small_and_odd_inputs():
    one = fit_label_model([[1.0, 0.0, np.nan]], ["a", "b", "c"])
    assert one.rows == 1 and 0 < one.posterior([[1.0, 0.0, np.nan]])[0] < 1
    assert one.summary()["labelers"]["c"] == {"sensitivity": 0.5, "specificity": 0.5}
    constant = np.c_[draw(500, seed=5)[1], np.ones(500)]  # a labeler that always says safe
    model = fit_label_model(constant)
    said_safe = np.log(model.sensitivity[-1]) - np.log1p(-model.specificity[-1])
    assert abs(said_safe) < 0.1  # near-uninformative: it says the same whatever the row


@pytest.mark.parametrize(
    ("votes", "kwargs", "message"),
    [
        (np.ones((10, 2)), {}, "at least 3 labelers"),
        (np.ones((0, 3)), {}, "no rows"),
        (np.ones(3), {}, "2-D"),
        ([[1.0, 0.5, 0.0]], {}, "row 0, labeler 1 is 0.5"),
        (np.ones((4, 3)), {"labelers": ["a", "b"]}, "2 labeler names for 3 columns"),
        (np.ones((4, 3)), {"smoothing": 0.0}, "smoothing must be > 0"),
        (np.ones((4, 3)), {"max_iter": 0}, "max_iter"),
    ],
)
def test_bad_input_is_a_clear_error(votes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_label_model(votes, **kwargs)


def test_posterior_checks_the_number_of_labelers():
    model = fit_label_model(np.ones((5, 3)))
    with pytest.raises(ValueError, match="votes have 4 labelers, the model has 3"):
        model.posterior(np.ones((2, 4)))
    assert check_votes([[True, False, True]]).dtype == np.float64


# ----------------------------------------------------------------------------- the judge

DEMO = [EvaluatorSection(kind="refusal"), EvaluatorSection(kind="probe")]  # the demo's judge
LABELERS = ["probe_objective", "probe_harm", "probe_refusal", "refusal_strict"]


def test_config_option_and_too_few_labelers():
    assert JudgeSection().combine == "weighted_mean"  # the default stays the weighted mean
    assert JudgeSection(combine="label_model").combine == "label_model"
    with pytest.raises(ValidationError):
        JudgeSection(combine="median")
    guarded = [EvaluatorSection(kind="refusal"), EvaluatorSection(kind="llama_guard", model="x")]
    with pytest.raises(ValueError, match=r"at least 3 safety labelers.*'llama_guard'\]"):
        CompositeJudge(guarded, combine="label_model")  # refused before any model loads
    with pytest.raises(ValueError, match="combine must be"):
        CompositeJudge([EvaluatorSection(kind="refusal")], combine="median")
    weightless = [EvaluatorSection(kind="refusal"), EvaluatorSection(kind="probe", weight=0)]
    with pytest.raises(ValueError, match="at least 3 safety labelers"):
        CompositeJudge(weightless, combine="label_model")  # weight 0: reported, not voted


@pytest.fixture(scope="module")
def rows():
    """Real (prompt, response) rows: PyRIT's refusal scorer rows, refusals and answers."""
    scored = load_scorer_rows("refusal")[:24]
    return [{"id": f"r{i}", "text": r.prompt, "response": r.response} for i, r in enumerate(scored)]


def test_label_model_judge_fits_once_over_all_rows(rows, ray_local):
    """The demo judge (refusal matcher + the cached training probe) through Ray Data."""
    from selfmoa_ray.evaluators.pool import judge_dataset, judge_dataset_fitted

    with pytest.raises(ValueError, match="at least 3 safety labelers"):
        judge_dataset(ray.data.from_items(rows), JudgeSection(combine="label_model", evaluators=[]))
    section = JudgeSection(evaluators=DEMO, combine="label_model", batch_size=5)
    judged, model = judge_dataset_fitted(ray.data.from_items(rows), section)
    out = sorted(judged.take_all(), key=lambda r: int(r["id"][1:]))
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert not [c for c in out[0] if c.startswith(VOTE_PREFIX)]  # votes dropped after the fit
    assert model is not None and model.labelers == tuple(LABELERS) and model.rows == len(rows)
    safety = np.array([r["safety"] for r in out])
    assert np.all((safety >= 0) & (safety <= 1))
    for row in out:
        assert isinstance(row["refusal"], bool | np.bool_)
        assert 0 <= row["helpfulness"] <= 1 and 0 <= row["judge_refusal_score"] <= 1
    # one fit over every row (batches of 5 would each fit their own): the same as fitting here
    columns = {c: np.array([r[c] for r in out]) for c in out[0]}
    votes = np.column_stack([labeler.votes(columns) for labeler in safety_labelers(DEMO)])
    expected = fit_label_model(votes, LABELERS).posterior(votes)
    np.testing.assert_allclose(safety, expected, rtol=1e-5, atol=1e-6)
    assert len(np.unique(votes, axis=0)) > 1  # the rows do not all vote alike


def test_a_prefixed_judge_keeps_its_votes_until_the_fit(rows):
    """The evaluate stage's second opinion (``prefix``): votes travel prefixed, then go."""
    from selfmoa_ray.evaluators.pool import _posterior_safety

    batch = {k: np.array([r[k] for r in rows]) for k in ("id", "text", "response")}
    scored = CompositeJudge(DEMO, prefix="t_", combine="label_model")(batch)
    final = {"id", "text", "response", "t_safety", "t_refusal", "t_helpfulness"}
    votes = [f"t_{VOTE_PREFIX}{name}" for name in LABELERS]
    assert set(scored) == final | set(votes)
    matrix = np.column_stack([scored[c] for c in votes])
    model = fit_label_model(matrix, LABELERS)
    out = _posterior_safety(pa.Table.from_pydict(scored), model, votes, "t_safety")
    assert set(out.column_names) == final and out.schema.field("t_safety").type == pa.float32()
    np.testing.assert_allclose(out.column("t_safety").to_numpy(), model.posterior(matrix))
    assert out.column("t_refusal").to_pylist() == scored["t_refusal"].tolist()
