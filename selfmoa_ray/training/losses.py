"""Training losses of design 2.1 step 6 (preference optimisation) and 2.2 step 5 (PT-ALIGN).

Small pure functions on log-probabilities, written to be read next to their papers: DPO
(Rafailov et al. 2023, "Direct Preference Optimization") with the conservative label-smoothed
form (cDPO, Mitchell 2023) and IPO (Azar et al. 2023, "A General Theoretical Paradigm to
Understand Learning from Human Preferences", Eq. 17); MODPO (Zhou et al. 2023, "Beyond
One-Preference-Fits-All", in our two-objective safety/helpfulness form); scalarised DPO over
per-objective scores; and PT-ALIGN's MLE plus token-level unlikelihood (Welleck et al. 2019,
"Neural Text Generation with Unlikelihood Training"). Every preference loss returns per-pair
losses (B,) and the detached implicit rewards ``beta * (log pi - log ref)`` of both sides; the
token losses return scalars that are 0, never NaN, when nothing is masked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _same_shape(reference_name: str, reference: Tensor, **others: Tensor) -> None:
    for name, tensor in others.items():
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {reference_name} has shape "
                f"{tuple(reference.shape)}"
            )


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(labels[b, t]) under softmax(logits[b, t]); (B,T,V),(B,T) -> (B,T), 0 where label -100.

    The caller shifts: ``logits[:, t]`` predicts ``labels[:, t]``. Half-precision logits are
    normalised row by row in float32 so the (B,T,V) float32 copy never exists at once.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but logits has shape {tuple(logits.shape)}; "
            "expected logits (B,T,V) and labels (B,T)"
        )
    keep = labels != IGNORE_INDEX
    index = labels.masked_fill(~keep, 0).unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index).squeeze(-1)
        logps = picked - torch.logsumexp(logits, dim=-1)
    else:
        logps = torch.stack(
            [
                row.float().log_softmax(-1).gather(-1, row_index).squeeze(-1)
                for row, row_index in zip(logits, index, strict=True)
            ]
        )
    return logps.masked_fill(~keep, 0.0)


def sequence_logps(token_logps: Tensor, mask: Tensor, *, average: bool = False) -> Tensor:
    """log pi(y|x) = sum_t mask_t * log p_t (or that sum / sum_t mask_t); (B,T),(B,T) -> (B,)."""
    _same_shape("token_logps", token_logps, mask=mask)
    mask = mask.bool()
    total = token_logps.masked_fill(~mask, 0.0).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def _check_pairs(policy_chosen_logps: Tensor, **others: Tensor) -> None:
    _same_shape("policy_chosen_logps", policy_chosen_logps, **others)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO per pair, with h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)).

    sigmoid (cDPO when eps > 0): -(1 - eps) log s(beta h) - eps log s(-beta h).
    ipo: (h - 1 / (2 beta))^2; pass length-averaged logps (``sequence_logps(average=True)``,
    reference averaged over the same tokens) for TRL's length-normalised IPO.
    Returns (losses, chosen_rewards, rejected_rewards), rewards = beta * (policy - ref), detached.
    """
    _check_pairs(
        policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    _positive("beta", beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing must be 0 with loss_type='ipo'")
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def modpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    safety_delta: Tensor,
    *,
    beta: float = 0.1,
    w_s: float = 0.5,
    w_h: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """MODPO: -log s((1/w_h) * (beta h - w_s * ds)), ds = s_safety(y_w) - s_safety(y_l).

    h as in ``dpo_loss``. The safety margin is subtracted, so a pair the safety score already
    separates (ds > 0) asks less of the policy. w_s = 0 gives DPO with beta / w_h.
    Rewards are beta * (policy - ref), detached, as in ``dpo_loss``.
    """
    _check_pairs(
        policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        safety_delta=safety_delta,
    )
    _positive("beta", beta)
    _positive("w_h", w_h)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margin = beta * (chosen_logratios - rejected_logratios) - w_s * safety_delta
    losses = -F.logsigmoid(margin / w_h)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _scalars(
    chosen_scores: Tensor, rejected_scores: Tensor, weights: Tensor | Sequence[float]
) -> tuple[Tensor, Tensor]:
    if chosen_scores.dim() != 2:
        raise ValueError(f"chosen_scores must be (B,K), got shape {tuple(chosen_scores.shape)}")
    _same_shape("chosen_scores", chosen_scores, rejected_scores=rejected_scores)
    # float64 so that pairs with equal weighted sums compare as exact ties.
    w = torch.as_tensor(weights, dtype=torch.float64, device=chosen_scores.device)
    if w.shape != chosen_scores.shape[1:]:
        raise ValueError(
            f"weights has shape {tuple(w.shape)} but the scores have K={chosen_scores.shape[1]} "
            "objectives"
        )
    return chosen_scores.double() @ w, rejected_scores.double() @ w


def nontie_mask(
    chosen_scores: Tensor, rejected_scores: Tensor, weights: Tensor | Sequence[float]
) -> Tensor:
    """(B,) bool: pairs whose scalars ``scores @ weights`` differ (scalarised DPO trains on these).

    Batch loss: ``losses.sum() / nontie_mask(...).sum().clamp(min=1)`` (ties are 0 in ``losses``).
    """
    chosen_scalar, rejected_scalar = _scalars(chosen_scores, rejected_scores, weights)
    return chosen_scalar != rejected_scalar


def scalarised_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    weights: Tensor | Sequence[float],
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO on pairs re-oriented by the scalar s = scores @ weights (scores (B,K), weights (K,)).

    Where s(rejected) > s(chosen) the two responses swap roles; exact ties get loss exactly 0
    (no gradient). Average over non-ties: ``losses.sum() / nontie_mask(...).sum().clamp(min=1)``.
    Rewards are those of the oriented sides (for ties, the stored order), detached.
    """
    _check_pairs(
        policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen_scalar, rejected_scalar = _scalars(chosen_scores, rejected_scores, weights)
    if chosen_scalar.shape != policy_chosen_logps.shape:
        raise ValueError(
            f"chosen_scores has {chosen_scalar.shape[0]} rows but policy_chosen_logps has shape "
            f"{tuple(policy_chosen_logps.shape)}"
        )
    swap = rejected_scalar > chosen_scalar
    tie = rejected_scalar == chosen_scalar
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        torch.where(swap, policy_rejected_logps, policy_chosen_logps),
        torch.where(swap, policy_chosen_logps, policy_rejected_logps),
        torch.where(swap, ref_rejected_logps, ref_chosen_logps),
        torch.where(swap, ref_chosen_logps, ref_rejected_logps),
        beta=beta,
        label_smoothing=label_smoothing,
    )
    return losses.masked_fill(tie, 0.0), chosen_rewards, rejected_rewards


def sft_loss(token_logps: Tensor, mask: Tensor) -> Tensor:
    """-(1/N) sum_{masked t} log p_t over all N masked tokens of the batch; 0 when N = 0."""
    _same_shape("token_logps", token_logps, mask=mask)
    mask = mask.bool()
    return -token_logps[mask].sum() / mask.sum().clamp(min=1)


def unlikelihood_loss(
    token_logps: Tensor, harmful_mask: Tensor, *, min_complement: float = 1e-6
) -> Tensor:
    """-(1/N) sum_{marked t} log max(1 - p_t, min_complement) over the N marked tokens; 0 if N = 0.

    log(1 - p) is computed from log p without cancellation at either end (:func:`log1mexp`).
    """
    _same_shape("token_logps", token_logps, harmful_mask=harmful_mask)
    _positive("min_complement", min_complement)
    harmful_mask = harmful_mask.bool()
    log_complement = log1mexp(token_logps[harmful_mask]).clamp(min=math.log(min_complement))
    return -log_complement.sum() / harmful_mask.sum().clamp(min=1)


def log1mexp(logp: Tensor) -> Tensor:
    """log(1 - exp(logp)) for logp <= 0: log(-expm1) near p = 1, log1p(-exp) for small p
    (Maechler 2012), where the other form loses most of its digits."""
    near_one = logp > -math.log(2)
    return torch.where(
        near_one,
        torch.log(-torch.expm1(logp.clamp(max=-1e-30))),
        torch.log1p(-torch.exp(logp.clamp(max=-math.log(2)))),
    )


def pt_align_loss(
    positive_token_logps: Tensor,
    positive_mask: Tensor,
    toxic_token_logps: Tensor,
    harmful_mask: Tensor,
    *,
    alpha: float = 1.0,
    min_complement: float = 1e-6,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PT-ALIGN: sft_loss(y+) + alpha * unlikelihood_loss(marked tokens of y-).

    Returns the total and detached parts for logging: "mle", "unlikelihood" and
    "harmful_prob_mass" (mean p over marked tokens, 0 when none).
    """
    _same_shape("positive_token_logps", positive_token_logps, positive_mask=positive_mask)
    _same_shape("toxic_token_logps", toxic_token_logps, harmful_mask=harmful_mask)
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    mle = sft_loss(positive_token_logps, positive_mask)
    unlikelihood = unlikelihood_loss(toxic_token_logps, harmful_mask, min_complement=min_complement)
    marked = harmful_mask.bool()
    with torch.no_grad():
        prob_mass = toxic_token_logps[marked].exp().sum() / marked.sum().clamp(min=1)
    parts = {
        "mle": mle.detach(),
        "unlikelihood": unlikelihood.detach(),
        "harmful_prob_mass": prob_mass,
    }
    return mle + alpha * unlikelihood, parts
