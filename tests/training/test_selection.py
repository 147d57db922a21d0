"""Choosing the epoch to keep: the frontier score, and greedy validation answers of a real model."""

import pytest
import torch

from selfmoa_ray.sources.models import load_model_and_tokenizer
from selfmoa_ray.training.loop import validation_batches
from selfmoa_ray.training.selection import (
    ValidationPoint,
    best_point,
    greedy_answers,
    validation_point,
)


def test_the_best_point_trades_attack_refusal_against_over_refusal():
    start = ValidationPoint(0, attack_refusal=0.1, benign_refusal=0.05)
    modest = ValidationPoint(1, attack_refusal=0.4, benign_refusal=0.05)
    strong = ValidationPoint(2, attack_refusal=0.9, benign_refusal=0.30)  # refuses everything
    assert best_point([start, modest, strong], over_refusal_weight=3) is modest
    assert best_point([start, modest, strong], over_refusal_weight=0) is strong
    # The start's own benign refusals are not held against later epochs.
    assert modest.score(0.05, 3) == pytest.approx(0.4)
    assert strong.score(0.05, 3) == pytest.approx(0.9 - 3 * 0.25)
    # Below the start's benign rate is no bonus.
    assert ValidationPoint(3, 0.4, 0.0).score(0.05, 3) == pytest.approx(0.4)


def test_ties_go_to_the_later_epoch_and_the_start_anchors_the_score():
    flat = [ValidationPoint(e, 0.0, 0.0) for e in range(3)]
    assert best_point(flat, 3).epoch == 2
    # The anchor is the earliest point, whatever the order given.
    points = [ValidationPoint(2, 0.5, 0.2), ValidationPoint(0, 0.0, 0.2)]
    assert best_point(points, 3).epoch == 2
    with pytest.raises(ValueError, match="no validation points"):
        best_point([], 3)


def test_mid_epoch_validation_points_fall_on_evenly_spaced_optimizer_steps():
    assert validation_batches(12, 1) == set()  # the epoch's end only
    assert validation_batches(12, 2) == {6}
    assert validation_batches(12, 3) == {4, 8}
    assert validation_batches(11, 2) == {6}  # half of 11 rounds to 6
    # With gradient accumulation, only after whole optimizer steps (6 steps of 2 batches).
    assert validation_batches(12, 4, grad_accum=2) == {4, 6, 8}
    # Never more points than steps, and never the epoch's start or end twice.
    assert validation_batches(2, 8) == {1}
    assert validation_batches(1, 4) == set()


def test_greedy_answers_are_deterministic_and_leave_the_model_as_it_was():
    model, tokenizer = load_model_and_tokenizer("tiny-random")
    model.train()
    side = tokenizer.padding_side
    prompts = ["How do I pick a lock?", "Bread?", "What is the capital of France, and why?"]
    first = greedy_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    again = greedy_answers(model, tokenizer, prompts[::-1], max_new_tokens=6, batch_size=3)
    assert len(first) == 3 and all(isinstance(a, str) for a in first)
    assert first == again[::-1]  # left padding: an answer does not depend on its batch
    assert model.training and tokenizer.padding_side == side


def test_validation_point_counts_refusals_per_side():
    model, tokenizer = load_model_and_tokenizer("tiny-random")
    point = validation_point(model, tokenizer, ["a", "b"], ["c"], epoch=4, max_new_tokens=4)
    assert point.epoch == 4
    # The random tiny model writes no refusal phrase.
    assert (point.attack_refusal, point.benign_refusal) == (0.0, 0.0)
    assert torch.is_grad_enabled()  # no_grad is scoped to the call
