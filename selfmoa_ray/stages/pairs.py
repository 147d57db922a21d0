"""Stage ``pairs``: per prompt, one chosen/rejected pair among its sampled responses (2.1 step 5).

scored.parquet -> pairs.parquet, in TRL's preference format (``prompt``, ``chosen``, ``rejected``
as chat messages) plus the score columns the trainer reads (``safety_delta`` for MODPO, the four
``chosen_*``/``rejected_*`` scores for scalarised DPO).

Two modes (``pairs.mode``):

* ``margin`` (default, MODPO-style): helpfulness is the objective, safety a constraint plus the
  stored margin. Only *safe* responses (safety >= ``judge.unsafe_threshold``) may be chosen; the
  chosen one is the most helpful of them. The rejected one is the least safe response when any is
  unsafe, else the least helpful of the others, and then the helpfulness gap must reach
  ``min_gap``. Why not "chosen = most helpful" over every response, as the design's first reading
  says: MODPO's loss always raises the chosen response's likelihood and only scales the push by
  the safety margin ``ds = s(chosen) - s(rejected)``, so preferring a helpful *unsafe* compliance
  would teach a small model to comply. Choosing among safe responses makes the helpfulness
  preference safe, and ``ds > 0`` on attack pairs makes MODPO push those pairs harder.
* ``weighted``: rank by ``rank_w_safety * safety + rank_w_helpfulness * helpfulness``; chosen = best,
  rejected = worst, kept when the score gap reaches ``min_gap``.
* ``intent``: the prompt's split says which objective it tests, so each pair teaches the one
  behaviour that prompt calls for. On an attack (any split but ``benign``) the chosen response is
  the safest safe one, a refusal (the judge's ``refusal`` verdict) before any other, and the
  rejected one the least safe; kept when the safety gap reaches ``min_gap`` or a refusal faces a
  non-refusal. On a benign-but-sensitive prompt the chosen response is the most helpful
  non-refusal and the rejected one a refusal when the policy refused (an over-refusal pair), else
  the least helpful, with a helpfulness gap of ``min_gap``. Why: a weighted score prefers a
  "safe" deflection as often as a refusal on attacks, and has no pairs that punish refusing a
  benign request, so a policy trained harder on it learns to refuse everything (issue 17: 42%
  over-refusal after two strong iterations).

Empty (whitespace-only) responses are never put in a pair, on either side: the trainer refuses
empty responses (:func:`selfmoa_ray.training.data.text_of`), so one would fail the reference pass.
Every choice is deterministic (ids sorted, ties broken by fixed rules ending in ``sample_index``),
so a rerun on the same scores gives the same file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from selfmoa_ray.config import PairsSection
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.schema import BENIGN_SPLIT, PAIR_SCHEMA
from selfmoa_ray.stage_io import group_by_prompt, read_rows

log = logging.getLogger(__name__)

INPUT_COLUMNS = (
    "id",
    "text",
    "category",
    "split",
    "sample_index",
    "response",
    "safety",
    "helpfulness",
)
DROP_REASONS = (
    "single_response",
    "no_safe_response",
    "empty_response",
    "identical_responses",
    "gap_below_min",
    "no_helpful_response",
)
# A gap that equals ``min_gap`` in decimal (0.7 - 0.6 vs 0.1) must count as reaching it.
GAP_TOLERANCE = 1e-9


def _is_empty(row: dict[str, Any]) -> bool:
    response = row["response"]
    return not isinstance(response, str) or not response.strip()


def _messages(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def _margin_pair(
    group: list[dict[str, Any]], min_gap: float, unsafe_threshold: float
) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """(chosen, rejected) under the margin rule, or the reason the prompt gives no pair."""
    safe = [r for r in group if r["safety"] >= unsafe_threshold]
    if not safe:
        return "no_safe_response"
    candidates = [r for r in safe if not _is_empty(r)]
    if not candidates:
        return "empty_response"
    chosen = max(candidates, key=lambda r: (r["helpfulness"], r["safety"], -r["sample_index"]))
    others = [r for r in group if r is not chosen and not _is_empty(r)]
    if not others:
        return "empty_response"
    unsafe = [r for r in others if r["safety"] < unsafe_threshold]
    if unsafe:
        rejected = min(unsafe, key=lambda r: (r["safety"], -r["helpfulness"], r["sample_index"]))
        return chosen, rejected
    rejected = min(others, key=lambda r: (r["helpfulness"], r["safety"], -r["sample_index"]))
    if chosen["helpfulness"] - rejected["helpfulness"] < min_gap - GAP_TOLERANCE:
        return "gap_below_min"
    return chosen, rejected


def _weighted_pair(
    group: list[dict[str, Any]], section: PairsSection
) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """(chosen, rejected) by the weighted score, or the reason the prompt gives no pair."""

    def score(r: dict[str, Any]) -> float:
        return section.rank_w_safety * r["safety"] + section.rank_w_helpfulness * r["helpfulness"]

    candidates = [r for r in group if not _is_empty(r)]
    if len(candidates) < 2:
        return "empty_response"
    # Ties: chosen is the lowest sample_index among the best, rejected the highest among the worst.
    chosen = max(candidates, key=lambda r: (score(r), -r["sample_index"]))
    others = [r for r in candidates if r is not chosen]
    rejected = min(others, key=lambda r: (score(r), -r["sample_index"]))
    if score(chosen) - score(rejected) < section.min_gap - GAP_TOLERANCE:
        return "gap_below_min"
    return chosen, rejected


def _intent_pair(
    group: list[dict[str, Any]], min_gap: float, unsafe_threshold: float
) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """(chosen, rejected) under the intent rule, or the reason the prompt gives no pair."""
    candidates = [r for r in group if not _is_empty(r)]
    if len(candidates) < 2:
        return "empty_response"
    refused = [r for r in candidates if r.get("refusal")]
    if group[0]["split"] == BENIGN_SPLIT:
        helpful = [r for r in candidates if not r.get("refusal")]
        if not helpful:
            return "no_helpful_response"
        chosen = max(helpful, key=lambda r: (r["helpfulness"], r["safety"], -r["sample_index"]))
        if refused:
            return chosen, min(refused, key=lambda r: (r["helpfulness"], r["sample_index"]))
        others = [r for r in helpful if r is not chosen]
        rejected = min(others, key=lambda r: (r["helpfulness"], r["safety"], -r["sample_index"]))
        if chosen["helpfulness"] - rejected["helpfulness"] < min_gap - GAP_TOLERANCE:
            return "gap_below_min"
        return chosen, rejected
    safe = [r for r in candidates if r["safety"] >= unsafe_threshold]
    if not safe:
        return "no_safe_response"
    chosen = max(safe, key=lambda r: (bool(r.get("refusal")), r["safety"], -r["sample_index"]))
    others = [r for r in candidates if r is not chosen and not r.get("refusal")]
    if not others:
        return "gap_below_min"  # every other answer refused too: nothing to prefer over
    rejected = min(others, key=lambda r: (r["safety"], -r["helpfulness"], r["sample_index"]))
    contrast = bool(chosen.get("refusal"))  # a refusal against a non-refusal
    if not contrast and chosen["safety"] - rejected["safety"] < min_gap - GAP_TOLERANCE:
        return "gap_below_min"
    return chosen, rejected


def pair_row(chosen: dict[str, Any], rejected: dict[str, Any]) -> dict[str, Any]:
    """One row of :data:`PAIR_SCHEMA` from two scored responses to the same prompt."""
    chosen_safety, rejected_safety = float(chosen["safety"]), float(rejected["safety"])
    return {
        "id": chosen["id"],
        "category": chosen["category"],
        "split": chosen["split"],
        "prompt": _messages("user", chosen["text"]),
        "chosen": _messages("assistant", chosen["response"]),
        "rejected": _messages("assistant", rejected["response"]),
        "chosen_safety": chosen_safety,
        "rejected_safety": rejected_safety,
        "chosen_helpfulness": float(chosen["helpfulness"]),
        "rejected_helpfulness": float(rejected["helpfulness"]),
        "safety_delta": chosen_safety - rejected_safety,
        "chosen_index": int(chosen["sample_index"]),
        "rejected_index": int(rejected["sample_index"]),
    }


def build_pairs(
    rows: Iterable[dict[str, Any]], section: PairsSection, unsafe_threshold: float
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pair rows (sorted by id) and, for every reason in :data:`DROP_REASONS`, how many prompts
    it dropped. ``rows`` are scored responses (see :data:`INPUT_COLUMNS`)."""
    pairs: list[dict[str, Any]] = []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    for group in group_by_prompt(rows):
        if len(group) < 2:
            result: tuple[dict[str, Any], dict[str, Any]] | str = "single_response"
        elif section.mode == "margin":
            result = _margin_pair(group, section.min_gap, unsafe_threshold)
        elif section.mode == "intent":
            result = _intent_pair(group, section.min_gap, unsafe_threshold)
        else:
            result = _weighted_pair(group, section)
        if isinstance(result, tuple) and (
            result[0]["response"].strip() == result[1]["response"].strip()
        ):
            result = "identical_responses"
        if isinstance(result, str):
            dropped[result] += 1
        else:
            pairs.append(pair_row(*result))
    return pairs, dropped


def pairs(
    run: RunDir,
    *,
    stage: str,
    scored: str,
    out: str,
    section: PairsSection,
    unsafe_threshold: float,
) -> dict[str, Any]:
    """Run (or skip, if done) pair construction from ``scored`` into ``out``; run-relative paths."""

    def work() -> dict[str, Any]:
        rows = read_rows(run.path(scored), INPUT_COLUMNS, optional=("refusal",))
        built, dropped = build_pairs(rows, section, unsafe_threshold)
        write_parquet(run.path(out), pa.Table.from_pylist(built, schema=PAIR_SCHEMA))
        prompts = len({r["id"] for r in rows})
        by_split = dict.fromkeys(sorted({r["split"] for r in rows}), 0)
        for row in built:
            by_split[row["split"]] += 1
        log.info(
            "%s: kept %d pairs of %d prompts (%s mode); dropped %s",
            stage,
            len(built),
            prompts,
            section.mode,
            ", ".join(f"{reason}={n}" for reason, n in dropped.items()),
        )
        return {
            "mode": section.mode,
            "prompts": prompts,
            "pairs": len(built),
            "dropped": dropped,
            "by_split": by_split,
        }

    return run.run_stage(stage, [out], work)
