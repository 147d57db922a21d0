"""The configured training objective: a tokenised batch in, one scalar loss and its metrics out.

``train.loss`` names an objective (training/objectives/: one module per loss, docs/design.md 2.1 step
6 and 2.2 step 5); this module feeds it the policy's log-probabilities from one forward pass over
chosen and rejected (or positive and toxic) responses together, and adds the optional terms any
pair objective can carry: SFT on the chosen responses (``train.sft_weight``) and, with
``train.unlikelihood``, PT-ALIGN's unlikelihood on the marked harmful tokens of the rejected ones
(the combined recipe). Batches arrive tokenised and padded (training/data.py); reference
log-probabilities come from the rows (the reference pass stored them), so the trainer holds a
single model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from selfmoa_ray.config import TrainSection
from selfmoa_ray.training import losses, objectives
from selfmoa_ray.training.data import MalformedPairError


def needs_reference(cfg: TrainSection) -> bool:
    """Whether the rows need the reference pass before training (PT-ALIGN's MLE + unlikelihood
    has no reference model; the preference losses do)."""
    return objectives.get(cfg.loss).reference


def is_preference(cfg: TrainSection) -> bool:
    """Whether ``cfg.loss`` trains on chosen/rejected pairs (and so has a preference accuracy)."""
    return objectives.get(cfg.loss).rows == "pairs"


def required_columns(cfg: TrainSection) -> list[str]:
    """Columns the rows must carry for ``cfg`` (checked before training starts)."""
    columns = list(objectives.get(cfg.loss).columns)
    if cfg.unlikelihood and "harmful_spans" not in columns:
        columns.append("harmful_spans")
    return columns


def check_columns(cfg: TrainSection, columns: Sequence[str]) -> None:
    require_columns(required_columns(cfg), columns, f"train.loss={cfg.loss}")


def require_columns(needed: Sequence[str], columns: Sequence[str], reader: str) -> None:
    """A clear error naming what ``reader`` needs when ``columns`` lack any of ``needed``."""
    missing = [c for c in needed if c not in columns]
    if missing:
        hint = " (run the reference pass first)" if any("ref_" in c for c in missing) else ""
        raise MalformedPairError(
            f"{reader} needs columns {missing}{hint}; the data has {list(columns)}"
        )


def response_token_logps(model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
    """(N, R) log-probabilities of each response token under ``model``, for a :func:`collate`
    batch: logits are computed for the response block only (``logits_to_keep``)."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=batch["logits_to_keep"],
    ).logits
    return losses.token_logps(logits[:, :-1], batch["labels"])


def compute_loss(
    model: torch.nn.Module, batch: dict[str, Any], cfg: TrainSection
) -> tuple[Tensor, dict[str, float]]:
    """The loss of ``cfg`` on a :func:`~selfmoa_ray.training.data.collate` batch (first side's
    rows, then the second side's), and metrics to report beside it."""
    objective = objectives.get(cfg.loss)
    token_logps = response_token_logps(model, batch)
    loss, metrics = objective.compute(token_logps, batch, cfg)
    if objective.rows != "pairs":
        return loss, metrics
    n = token_logps.shape[0] // 2
    if cfg.sft_weight > 0:
        sft = losses.sft_loss(token_logps[:n], batch["response_mask"][:n])
        loss = loss + cfg.sft_weight * sft
        metrics["sft_loss"] = float(sft.detach())
    if cfg.unlikelihood and cfg.unlikelihood_alpha > 0:
        # Self-MOA pairs plus PT-ALIGN's unlikelihood on the harmful tokens of the rejected
        # responses (0 for a batch without marked tokens).
        harmful = batch["harmful_mask"][n:]
        unlikelihood = losses.unlikelihood_loss(token_logps[n:], harmful)
        loss = loss + cfg.unlikelihood_alpha * unlikelihood
        metrics["unlikelihood"] = float(unlikelihood.detach())
        metrics["harmful_tokens"] = float(harmful.sum())
    return loss, metrics
