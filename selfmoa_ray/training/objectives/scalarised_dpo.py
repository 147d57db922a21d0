"""Scalarised DPO: the pair's preference is the sign of w . (chosen scores - rejected scores) over
[safety, helpfulness] (weights ``train.loss_w_safety``, ``train.loss_w_helpfulness``); tied pairs are left out of the mean."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from selfmoa_ray.config import TrainSection
from selfmoa_ray.training import losses
from selfmoa_ray.training.objectives.base import (
    PAIR_COLUMNS,
    Objective,
    pair_logps,
    preference_metrics,
)

SCORE_COLUMNS = (
    ("chosen_safety", "chosen_helpfulness"),
    ("rejected_safety", "rejected_helpfulness"),
)


def compute(token_logps: Tensor, batch: dict[str, Any], cfg: TrainSection) -> tuple[Tensor, dict]:
    chosen_s, rejected_s = (torch.stack([batch[c] for c in side], dim=1) for side in SCORE_COLUMNS)
    weights = [cfg.loss_w_safety, cfg.loss_w_helpfulness]
    per_pair, chosen, rejected = losses.scalarised_dpo_loss(
        *pair_logps(token_logps, batch),
        chosen_s,
        rejected_s,
        weights,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
    )
    kept = losses.nontie_mask(chosen_s, rejected_s, weights)
    loss = per_pair.sum() / kept.sum().clamp(min=1)
    return loss, preference_metrics(loss, chosen, rejected)


OBJECTIVE = Objective(
    "scalarised_dpo",
    rows="pairs",
    columns=(*PAIR_COLUMNS, *(c for side in SCORE_COLUMNS for c in side)),
    reference=True,
    compute=compute,
)
