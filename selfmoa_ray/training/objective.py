"""The configured training objective: a tokenised batch in, one scalar loss and its metrics out.

Chooses the loss of ``train.loss`` (design.md 2.1 step 6 and 2.2 step 5) and feeds it the policy's
log-probabilities from one forward pass over chosen and rejected (or positive and toxic)
responses together. Batches arrive tokenised and padded (training/data.py); reference
log-probabilities come from the rows (the reference pass stored them), so the trainer holds a
single model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from selfmoa_ray.config import TrainSection
from selfmoa_ray.training import losses
from selfmoa_ray.training.data import MalformedPairError

PAIR_LOSSES = ("dpo", "ipo", "modpo", "scalarised_dpo")
SCORE_COLUMNS = (
    ("chosen_safety", "chosen_helpfulness"),
    ("rejected_safety", "rejected_helpfulness"),
)


def needs_reference(cfg: TrainSection) -> bool:
    """PT-ALIGN's MLE + unlikelihood has no reference model; the preference losses do."""
    return cfg.loss in PAIR_LOSSES


def required_columns(cfg: TrainSection) -> list[str]:
    """Columns the rows must carry for ``cfg.loss`` (checked before training starts)."""
    if cfg.loss == "pt_align":
        return ["prompt", "positive", "toxic", "harmful_spans"]
    columns = ["prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"]
    if cfg.loss == "ipo":
        columns = columns[:3] + ["ref_chosen_logps_avg", "ref_rejected_logps_avg"]
    if cfg.loss == "modpo":
        columns.append("safety_delta")
    if cfg.loss == "scalarised_dpo":
        columns += [c for side in SCORE_COLUMNS for c in side]
    return columns


def check_columns(cfg: TrainSection, columns: Sequence[str]) -> None:
    missing = [c for c in required_columns(cfg) if c not in columns]
    if missing:
        hint = " (run the reference pass first)" if any("ref_" in c for c in missing) else ""
        raise MalformedPairError(
            f"train.loss={cfg.loss} needs columns {missing}{hint}; the data has {list(columns)}"
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
    """The loss of ``cfg.loss`` on a :func:`~selfmoa_ray.training.data.collate` batch (first
    side's rows, then the second side's), and metrics to report beside it."""
    n = batch["input_ids"].shape[0] // 2
    token_logps = response_token_logps(model, batch)
    mask, harmful = batch["response_mask"], batch["harmful_mask"]
    if cfg.loss == "pt_align":
        loss, parts = losses.pt_align_loss(
            token_logps[:n], mask[:n], token_logps[n:], harmful[n:], alpha=cfg.unlikelihood_alpha
        )
        metrics = {k: float(v) for k, v in parts.items()}
        metrics["harmful_tokens"] = float(harmful[n:].sum())
        return loss, metrics
    return _preference(token_logps, batch, cfg, n)


def _preference(
    token_logps: Tensor, batch: dict[str, Any], cfg: TrainSection, n: int
) -> tuple[Tensor, dict[str, float]]:
    mask = batch["response_mask"]
    average = cfg.loss == "ipo"  # IPO on length-normalised log-ratios, as TRL computes it
    logps = losses.sequence_logps(token_logps, mask, average=average)
    suffix = "_avg" if average else ""
    policy = (logps[:n], logps[n:])
    ref = (batch[f"ref_chosen_logps{suffix}"], batch[f"ref_rejected_logps{suffix}"])
    if cfg.loss in ("dpo", "ipo"):
        loss_type = "ipo" if cfg.loss == "ipo" else "sigmoid"
        per_pair, chosen_r, rejected_r = losses.dpo_loss(
            *policy, *ref, beta=cfg.beta, label_smoothing=cfg.label_smoothing, loss_type=loss_type
        )
        loss = per_pair.mean()
    elif cfg.loss == "modpo":
        per_pair, chosen_r, rejected_r = losses.modpo_loss(
            *policy, *ref, batch["safety_delta"], beta=cfg.beta, w_s=cfg.w_s, w_h=cfg.w_h
        )
        loss = per_pair.mean()
    else:  # scalarised_dpo: scores [safety, helpfulness] weighted by [w_s, w_h]
        chosen_s, rejected_s = (
            torch.stack([batch[c] for c in side], dim=1) for side in SCORE_COLUMNS
        )
        weights = [cfg.w_s, cfg.w_h]
        per_pair, chosen_r, rejected_r = losses.scalarised_dpo_loss(
            *policy, *ref, chosen_s, rejected_s, weights,
            beta=cfg.beta, label_smoothing=cfg.label_smoothing,
        )  # fmt: skip
        kept = losses.nontie_mask(chosen_s, rejected_s, weights)
        loss = per_pair.sum() / kept.sum().clamp(min=1)
    metrics = {
        "preference_loss": float(loss.detach()),
        "rewards_chosen": float(chosen_r.mean()),
        "rewards_rejected": float(rejected_r.mean()),
        "reward_margin": float((chosen_r - rejected_r).mean()),
        "preference_accuracy": float((chosen_r > rejected_r).float().mean()),
    }
    if cfg.sft_weight > 0:
        sft = losses.sft_loss(token_logps[:n], mask[:n])
        loss = loss + cfg.sft_weight * sft
        metrics["sft_loss"] = float(sft.detach())
    if batch["marked"] and cfg.unlikelihood_alpha > 0:
        # The combined recipe: Self-MOA pairs plus PT-ALIGN's unlikelihood on the harmful tokens
        # of the rejected responses (0 for a batch without marked tokens).
        harmful = batch["harmful_mask"][n:]
        unlikelihood = losses.unlikelihood_loss(token_logps[n:], harmful)
        loss = loss + cfg.unlikelihood_alpha * unlikelihood
        metrics["unlikelihood"] = float(unlikelihood.detach())
        metrics["harmful_tokens"] = float(harmful.sum())
    return loss, metrics
