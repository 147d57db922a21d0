"""DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * (chosen - rejected log-ratio)), with
conservative label smoothing (``train.label_smoothing``) as TRL's ``sigmoid`` loss."""

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
    per_pair, chosen, rejected = losses.dpo_loss(
        *pair_logps(token_logps, batch), beta=cfg.beta, label_smoothing=cfg.label_smoothing
    )
    loss = per_pair.mean()
    return loss, preference_metrics(loss, chosen, rejected)


OBJECTIVE = Objective("dpo", rows="pairs", columns=PAIR_COLUMNS, reference=True, compute=compute)
