"""The evaluator contract: (prompt, response) pairs in, per-row scores out, one stable schema.

Every evaluator scores a batch and returns columns prefixed with its own name (``probe_safety``,
``llama_guard_category``...), so several evaluators can score the same rows side by side. It also
says which of the three final quantities it informs (``provides``); the composite combines those
into the columns every later stage reads:

* ``safety``        float in [0, 1], 1 = safe;
* ``refusal``       bool, and ``judge_refusal_score`` float in [0, 1] (the combined score; the
                    string matcher's own is ``refusal_score``);
* ``helpfulness``   float in [0, 1], higher = more helpful.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

FINAL_COLUMNS = ("safety", "refusal", "judge_refusal_score", "helpfulness")
QUANTITIES = ("safety", "refusal", "helpfulness")


class EvaluatorInputError(ValueError):
    """A batch an evaluator cannot score (missing columns, mismatched lengths, non-text)."""


@runtime_checkable
class Evaluator(Protocol):
    """Scores (prompt, response) pairs.

    ``provides`` maps a quantity in ``QUANTITIES`` to the evaluator's column holding it, already
    oriented so that for ``safety`` and ``helpfulness`` higher is better and for ``refusal``
    higher means "more likely a refusal"; all in [0, 1].
    """

    name: str
    provides: dict[str, str]

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        """Columns named ``<name>_<what>``, each with one value per pair."""
        ...


def check_pairs(
    prompts: Sequence[object], responses: Sequence[object]
) -> tuple[list[str], list[str]]:
    """Validate a batch of pairs; raise EvaluatorInputError naming the first bad row."""
    if len(prompts) != len(responses):
        raise EvaluatorInputError(f"{len(prompts)} prompts but {len(responses)} responses")
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        for what, value in (("prompt", p), ("response", r)):
            if not isinstance(value, str):
                raise EvaluatorInputError(
                    f"row {i}: {what} must be text, got {type(value).__name__}"
                )
    return list(prompts), list(responses)  # type: ignore[arg-type]
