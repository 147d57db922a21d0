"""The configured objective on a real tiny model: the combined recipe's unlikelihood term."""

import pytest
import torch

from selfmoa_ray.config import TrainSection
from selfmoa_ray.sources.models import load_model_and_tokenizer
from selfmoa_ray.training.data import encode_pairs
from selfmoa_ray.training.objective import compute_loss

PROMPT = [{"role": "user", "content": "How do I get into my neighbour's wifi?"}]
REJECTED = "Sure, just guess the password and crack the router."
HARMFUL = "crack the router"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    return load_model_and_tokenizer("tiny-random")


def loss_of(model, tokenizer, rows, cfg):
    return compute_loss(model, encode_pairs(tokenizer, rows, max_length=cfg.max_length), cfg)


def pair(**extra):
    return {
        "prompt": PROMPT,
        "chosen": [{"role": "assistant", "content": "Ask your neighbour for the password."}],
        "rejected": [{"role": "assistant", "content": REJECTED}],
        "ref_chosen_logps": -40.0,
        "ref_rejected_logps": -35.0,
        "safety_delta": 1.0,
        **extra,
    }


def marked_pair() -> dict:
    """A pair whose rejected answer has HARMFUL marked as its harmful span."""
    start = REJECTED.index(HARMFUL)
    return pair(harmful_spans=[[start, start + len(HARMFUL)]])


def by_hand_unlikelihood(model, tokenizer) -> tuple[torch.Tensor, int]:
    """-mean log(1 - p) over the tokens of HARMFUL in the rejected answer, computed directly,
    and how many tokens that is."""
    prompt_ids = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    enc = tokenizer(REJECTED, add_special_tokens=False, return_offsets_mapping=True)
    start = REJECTED.index(HARMFUL)
    marked = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < start + len(HARMFUL)
              and b > start]  # fmt: skip
    ids = torch.tensor([list(prompt_ids) + enc["input_ids"]])
    with torch.no_grad():
        probs = model(input_ids=ids).logits.softmax(-1)[0]
    p = torch.stack(
        [probs[len(prompt_ids) + i - 1, enc["input_ids"][i]] for i in marked]
    )  # the logits at position t predict token t + 1
    return -torch.log1p(-p).mean(), len(marked)


def test_marked_rejected_tokens_add_alpha_times_their_unlikelihood(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    marked = [marked_pair()]
    cfg = TrainSection(loss="modpo", max_length=64, unlikelihood_alpha=0.0)
    with torch.no_grad():
        base, base_metrics = loss_of(model, tokenizer, [pair()], cfg)
        cfg_ul = cfg.model_copy(update={"unlikelihood_alpha": 2.0, "unlikelihood": True})
        total, metrics = loss_of(model, tokenizer, marked, cfg_ul)
    expected, count = by_hand_unlikelihood(model, tokenizer)
    assert "unlikelihood" not in base_metrics  # pairs without spans: the plain preference loss
    assert metrics["harmful_tokens"] == count == 3  # " crack", " the", " router"
    assert metrics["unlikelihood"] == pytest.approx(float(expected), rel=1e-4)
    assert float(total) == pytest.approx(float(base) + 2.0 * float(expected), rel=1e-4)


def test_spans_add_nothing_unless_unlikelihood_is_asked(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    marked = [marked_pair()]
    cfg = TrainSection(loss="modpo", max_length=64, unlikelihood_alpha=2.0)
    with torch.no_grad():
        plain, _ = loss_of(model, tokenizer, [pair()], cfg)
        spans, metrics = loss_of(model, tokenizer, marked, cfg)
    assert "unlikelihood" not in metrics
    assert float(spans) == pytest.approx(float(plain))


def test_pairs_with_empty_spans_train_like_plain_pairs(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cfg = TrainSection(loss="modpo", max_length=64, unlikelihood=True)
    with torch.no_grad():
        plain, _ = loss_of(model, tokenizer, [pair()], cfg)
        empty, metrics = loss_of(model, tokenizer, [pair(harmful_spans=[])], cfg)
    assert metrics["unlikelihood"] == 0.0 and metrics["harmful_tokens"] == 0.0
    assert float(empty) == pytest.approx(float(plain))
