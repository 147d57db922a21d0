"""PT-ALIGN (docs/design.md 2.2 step 5): MLE on the harmless positive answer plus ``alpha`` times
token-level unlikelihood, -log(1 - p), on the marked harmful tokens of the toxic answer. No
reference model."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from selfmoa_ray.config import TrainSection
from selfmoa_ray.training import losses
from selfmoa_ray.training.objectives.base import Objective


def compute(token_logps: Tensor, batch: dict[str, Any], cfg: TrainSection) -> tuple[Tensor, dict]:
    n = token_logps.shape[0] // 2
    mask, harmful = batch["response_mask"], batch["harmful_mask"]
    loss, parts = losses.pt_align_loss(
        token_logps[:n], mask[:n], token_logps[n:], harmful[n:], alpha=cfg.unlikelihood_alpha
    )
    metrics = {k: float(v) for k, v in parts.items()}
    metrics["harmful_tokens"] = float(harmful[n:].sum())
    return loss, metrics


OBJECTIVE = Objective(
    "pt_align",
    rows="triples",
    columns=("prompt", "positive", "toxic", "harmful_spans"),
    reference=False,
    compute=compute,
)
