"""MODPO (Zhou et al. 2024, eq. 9): DPO on helpfulness preferences with a safety margin,
(1 / w_h) * (beta * log-ratio difference - w_s * safety_delta), w_s = ``train.loss_w_safety``,
w_h = ``train.loss_w_helpfulness``; w_s = 0 is plain DPO."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from selfmoa_ray.config import TrainSection
from selfmoa_ray.training import losses
from selfmoa_ray.training.objectives.base import (
    PAIR_COLUMNS,
    Objective,
    pair_logps,
    preference_metrics,
)


def compute(token_logps: Tensor, batch: dict[str, Any], cfg: TrainSection) -> tuple[Tensor, dict]:
    per_pair, chosen, rejected = losses.modpo_loss(
        *pair_logps(token_logps, batch),
        batch["safety_delta"],
        beta=cfg.beta,
        w_s=cfg.loss_w_safety,
        w_h=cfg.loss_w_helpfulness,
    )
    loss = per_pair.mean()
    return loss, preference_metrics(loss, chosen, rejected)


OBJECTIVE = Objective(
    "modpo", rows="pairs", columns=(*PAIR_COLUMNS, "safety_delta"), reference=True, compute=compute
)
