"""What every objective declares, and the pieces the preference objectives share.

A preference objective (DPO and its kin) reads the policy's summed log-probability of the chosen
and the rejected response, and the reference model's, stored in the rows by the reference pass; it
returns a loss per pair and the implicit rewards beta * (policy - reference) of both sides, from
which the trainer reports accuracy and margin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from selfmoa_ray.config import TrainSection
from selfmoa_ray.training.losses import sequence_logps

# Pair rows, and the reference pass's log-probabilities of both sides
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")
# The same, length-normalised (mean log-probability per token)
PAIR_COLUMNS_AVG = (
    "prompt",
    "chosen",
    "rejected",
    "ref_chosen_logps_avg",
    "ref_rejected_logps_avg",
)

# (loss, metrics) of a batch: the policy's per-token log-probs of the first side's responses then
# the second side's (N/2 rows each), the collated batch, the config
Compute = Callable[[Tensor, dict[str, Any], TrainSection], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Objective:
    """One training objective: what it reads and how it computes.

    ``rows``: ``pairs`` (prompt, chosen, rejected) or ``triples`` (prompt, positive, toxic,
    harmful_spans: PT-ALIGN); ``columns``: what the rows must carry (checked before training);
    ``reference``: whether a reference pass must add the reference log-probabilities first.
    """

    name: str
    rows: Literal["pairs", "triples"]
    columns: tuple[str, ...]
    reference: bool
    compute: Compute


def preference_metrics(loss: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict:
    """What a preference objective reports beside its loss (the names TRL logs, without
    ``rewards/``)."""
    return {
        "preference_loss": float(loss.detach()),
        "rewards_chosen": float(chosen_rewards.mean()),
        "rewards_rejected": float(rejected_rewards.mean()),
        "reward_margin": float((chosen_rewards - rejected_rewards).mean()),
        "preference_accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
    }


def pair_logps(
    token_logps: Tensor, batch: dict[str, Any], *, average: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(policy chosen, policy rejected, reference chosen, reference rejected) log-probs of each
    pair: summed over the response, or its mean per token when ``average``."""
    n = token_logps.shape[0] // 2
    logps = sequence_logps(token_logps, batch["response_mask"], average=average)
    suffix = "_avg" if average else ""
    return (
        logps[:n],
        logps[n:],
        batch[f"ref_chosen_logps{suffix}"],
        batch[f"ref_rejected_logps{suffix}"],
    )
