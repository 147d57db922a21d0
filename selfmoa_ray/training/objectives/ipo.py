"""IPO (Azar et al. 2023, eq. 17): (log-ratio difference - 1 / (2 beta))^2, on length-normalised
log-probabilities as TRL computes it."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from selfmoa_ray.config import TrainSection
from selfmoa_ray.training import losses
from selfmoa_ray.training.objectives.base import (
    PAIR_COLUMNS_AVG,
    Objective,
    pair_logps,
    preference_metrics,
)


def compute(token_logps: Tensor, batch: dict[str, Any], cfg: TrainSection) -> tuple[Tensor, dict]:
    per_pair, chosen, rejected = losses.dpo_loss(
        *pair_logps(token_logps, batch, average=True),
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        loss_type="ipo",
    )
    loss = per_pair.mean()
    return loss, preference_metrics(loss, chosen, rejected)


OBJECTIVE = Objective(
    "ipo", rows="pairs", columns=PAIR_COLUMNS_AVG, reference=True, compute=compute
)
