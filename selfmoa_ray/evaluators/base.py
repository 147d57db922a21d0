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


class Renamed:
    """An evaluator under another name (``name:`` in config): each column's ``<old>_`` prefix
    becomes ``<name>_``, so two evaluators of one kind score side by side."""

    def __init__(self, evaluator: Evaluator, name: str):
        self.evaluator, self.name, self._old = evaluator, name, evaluator.name
        self.provides = {q: self._rename(c) for q, c in evaluator.provides.items()}

    def __getattr__(self, attr: str) -> object:  # the wrapped evaluator's own attributes
        if attr == "evaluator":  # not set yet (a copy being built): no recursion
            raise AttributeError(attr)
        return getattr(self.evaluator, attr)

    def _rename(self, column: str) -> str:
        if not column.startswith(f"{self._old}_"):
            raise ValueError(
                f"evaluator {self._old!r} returned column {column!r}, not named '{self._old}_...'"
            )
        return self.name + column[len(self._old) :]

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        out = self.evaluator.score(prompts, responses)
        return {self._rename(column): values for column, values in out.items()}


def named(evaluator: Evaluator, name: str) -> Evaluator:
    """``evaluator`` with its columns prefixed by ``name`` (itself when that is its name)."""
    return evaluator if evaluator.name == name else Renamed(evaluator, name)
