"""Which epoch of an iteration to keep: the safety/over-refusal frontier on validation prompts.

A preference update that is too small leaves the policy where it was; one too large teaches it to
refuse everything (issue 17: 71% refusal of attacks, and 42% of benign requests, after two strong
iterations). So the worker answers a fixed validation set before training and after every epoch,
and keeps the weights with the best score

    score = refusal rate on the validation attacks
            - over_refusal_weight * max(0, refusal rate on the validation benign prompts
                                           - that rate before training)

ties going to the later epoch (the refusal matcher cannot tell those epochs apart, and the later
one learned its pairs further). The validation prompts are human seed attacks and
benign-but-sensitive prompts that the red team never uses and that are kept off the held-out
evaluation sets (stages/validation.py): the held-out sets stay for measuring, never for choosing.
Answers are greedy and short (refusing or not shows in the first words) and judged by the refusal
matcher of the training judge (evaluators/refusal.py), so an epoch costs one batched ``generate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from selfmoa_ray.evaluators.refusal import is_refusal


@dataclass(frozen=True)
class ValidationPoint:
    """The policy after ``epoch`` epochs (0: before training; 0.5: half-way through the first)
    on the validation prompts."""

    epoch: float
    attack_refusal: float
    benign_refusal: float

    def score(self, start_benign_refusal: float, over_refusal_weight: float) -> float:
        rise = max(0.0, self.benign_refusal - start_benign_refusal)
        return self.attack_refusal - over_refusal_weight * rise


def best_point(
    points: Sequence[ValidationPoint],
    over_refusal_weight: float,
    start_benign_refusal: float | None = None,
) -> ValidationPoint:
    """The point with the highest score; the latest epoch among equals. The benign refusal rate
    before training anchors the score: ``start_benign_refusal``, else the earliest point's."""
    if not points:
        raise ValueError("no validation points to choose from")
    if start_benign_refusal is None:
        start_benign_refusal = min(points, key=lambda p: p.epoch).benign_refusal
    return max(points, key=lambda p: (p.score(start_benign_refusal, over_refusal_weight), p.epoch))


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    tokenizer: object,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers of ``model`` to single-turn ``prompts`` under the chat template.

    64 prompts a batch: the demo's 32 + 32 validation prompts in one batch take 5.8 s on 2 cores
    against 8.3 s in two batches of 32 (11.1 s in four of 16), with the same answers (checked on
    the demo's three trained policies); a validation point runs 7 times an iteration."""
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right end of each row
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chats = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
                for p in prompts[start : start + batch_size]
            ]
            enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def validation_point(
    model: torch.nn.Module,
    tokenizer: object,
    attacks: Sequence[str],
    benign: Sequence[str],
    *,
    epoch: float,
    max_new_tokens: int,
) -> ValidationPoint:
    """Refusal rates of ``model``'s greedy answers to the validation attacks and benign prompts."""
    answers = greedy_answers(model, tokenizer, [*attacks, *benign], max_new_tokens=max_new_tokens)
    refused = [is_refusal(a) for a in answers]

    def rate(values: Sequence[bool]) -> float:
        return sum(values) / len(values) if values else 0.0

    return ValidationPoint(epoch, rate(refused[: len(attacks)]), rate(refused[len(attacks) :]))
