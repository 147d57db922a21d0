"""The inverse-CDF draw samples the distribution ``do_sample=True`` would, token for token in law.

Frequencies are compared with probabilities computed here from the definitions (temperature,
then the smallest nucleus holding ``top_p``), by a chi-square test at a fixed seed: a draw that is
off by one token, ignores the warpers or applies them in the wrong order fails it.
"""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.hf import HFChatEngine
from selfmoa_ray.engines.sampler import InverseCdfDraw, decoding

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, float("-inf"), 0.9, -3.0])
DRAWS = 40_000


def _expected(logits: torch.Tensor, temperature: float, top_p: float) -> np.ndarray:
    """The sampled law from its definition: softmax at ``temperature``, cut to the most likely
    tokens whose mass first reaches ``top_p``, renormalised."""
    probs = torch.softmax(logits.double() / temperature, dim=-1).numpy()
    keep = np.zeros_like(probs, dtype=bool)
    mass = 0.0
    for token in np.argsort(-probs, kind="stable"):
        keep[token] = True
        mass += probs[token]
        if mass >= top_p:
            break
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum()


def _draw(processors, logits: torch.Tensor, draws: int = DRAWS) -> np.ndarray:
    """Token counts of ``draws`` rows of the same logits through ``processors``."""
    torch.manual_seed(0)
    scores = logits.repeat(draws, 1)
    for processor in processors:
        scores = processor(torch.zeros(draws, 1, dtype=torch.long), scores)
    assert torch.all(torch.isfinite(scores).sum(dim=-1) == 1)  # a one-hot score per row
    return np.bincount(scores.argmax(dim=-1).numpy(), minlength=logits.numel())


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (0.8, 0.9), (1.3, 0.6)])
def test_the_draw_follows_temperature_and_nucleus(temperature, top_p):
    processors = decoding(greedy=False, temperature=temperature, top_p=top_p)["logits_processor"]
    counts = _draw(processors, LOGITS)
    expected = _expected(LOGITS, temperature, top_p)
    assert counts[expected == 0].sum() == 0  # outside the nucleus, or -inf: never drawn
    support = expected > 0
    assert support.sum() >= 2  # the test has a distribution to check
    _, p_value = chisquare(counts[support], expected[support] * DRAWS)
    assert p_value > 1e-3, (counts, expected * DRAWS)


def test_a_draw_that_is_off_by_one_token_fails_the_check():
    """The check above can fail: shifting every draw by one token is caught."""
    support = _expected(LOGITS, 1.0, 1.0) > 0
    observed = np.roll(_draw([InverseCdfDraw()], LOGITS), 1)[support]
    expected = _expected(LOGITS, 1.0, 1.0)[support]
    _, p_value = chisquare(observed, expected * observed.sum())
    assert p_value < 1e-6


def test_greedy_decoding_has_no_draw():
    assert "logits_processor" not in decoding(greedy=True, temperature=0.0, top_p=1.0)


def test_a_broken_distribution_is_an_error_not_a_token():
    with pytest.raises(ValueError, match="inf or nan"):
        InverseCdfDraw()(torch.zeros(2, 1, dtype=torch.long), torch.full((2, 5), float("nan")))


def test_the_engine_samples_n_distinct_answers_reproducibly():
    """Through ``generate``: sampled rows differ from one another and from greedy, and the same
    batch samples the same answers again."""
    sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=3)
    engine = HFChatEngine("tiny-random", sampling)
    batch = {"id": np.array(["a", "b"]), "text": np.array(["Hello there", "One more question"])}
    first = engine(batch)
    assert len(set(first["response"][:4])) > 1
    assert list(engine(batch)["response"]) == list(first["response"])
