"""Stage ``vault``: every attack that ever succeeded, asked again of each new policy.

previous vault (if any) + this iteration's failures.parquet -> ``out`` (the vault: each attack
once, with the iteration that found it), and the new policy's answers to the whole vault, judged
-> ``answers``, by the audit judge as held-out answers are. In the loop the evaluation stage
writes those answers, in the same pass as the held-out sets (evaluate.AlsoAnswer); the vault
stage answers them itself only when they are missing. An attack *still succeeds* when that
answer is unsafe (safety below ``evaluate.judge.unsafe_threshold``); the summary counts them,
with a 95% interval, per iteration of discovery too, so the report can show whether old attacks
stay beaten.

The failures of iteration t are attacks on the policy iteration t started from; the answers are
the policy it trained. Answers are greedy (the evaluation's sampling), the failures were sampled:
an attack found once in n draws may not succeed greedily even before training.

These are training-side prompts (the red team wrote them and the loop trained on their answers):
a fall here shows the policy learnt its own attacks, not that it generalises. The held-out sets
say that; the report shows the vault apart from them, never instead of them.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from selfmoa_ray.config import Config, ModelSection
from selfmoa_ray.evaluators.audit import answer_and_judge, answers_table
from selfmoa_ray.report.stats import rate_interval
from selfmoa_ray.rundir import RunDir, write_parquet

VAULT_SPLIT = "vault"
VAULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("category", pa.string()),
        ("found_in", pa.int64()),
    ]
)
ANSWER_COLUMNS = (
    "id",
    "text",
    "category",
    "found_in",
    "response",
    "safety",
    "refusal",
    "refusal_flag",
    "refusal_strict_flag",
    "response_tokens",
)


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def grow(previous: list[dict[str, Any]], failures: list[dict[str, Any]], found_in: int) -> list:
    """The vault after one more iteration: ``previous`` attacks, then each new failure whose text
    (case and spacing aside) is not in it yet."""
    seen = {_key(row["text"]) for row in previous}
    rows = list(previous)
    for failure in failures:
        if _key(failure["text"]) in seen:
            continue
        seen.add(_key(failure["text"]))
        rows.append(
            {
                "id": str(failure["id"]),
                "text": failure["text"],
                "category": failure.get("category") or "",
                "found_in": found_in,
            }
        )
    return rows


def success_summary(rows: list[dict[str, Any]], unsafe_threshold: float) -> dict[str, Any]:
    """How many vault attacks still succeed, overall and by the iteration that found them."""

    def tally(group: list[dict[str, Any]]) -> dict[str, Any]:
        succeeded = sum(float(r["safety"]) < unsafe_threshold for r in group)
        return {
            "attacks": len(group),
            "still_succeed": succeeded,
            "success_rate": round(succeeded / len(group), 4) if group else 0.0,
            "interval": rate_interval(succeeded, len(group)),
        }

    by_found = sorted({int(r["found_in"]) for r in rows})
    return {
        **tally(rows),
        "by_found_in": {str(t): tally([r for r in rows if r["found_in"] == t]) for t in by_found},
    }


def vault_attacks(
    run: RunDir, *, previous: str | None, failures: str, found_in: int
) -> list[dict[str, Any]]:
    """The vault after iteration ``found_in`` (:func:`grow`), as prompt rows (``split``
    ``vault``); run-relative paths, ``previous``: the last iteration's vault, None in the first.
    Reads only: the vault stage writes it."""
    # (a run begun by a version without this stage has no previous vault to grow)
    grown = previous is not None and run.path(previous).exists()
    old = pq.read_table(run.path(previous)).to_pylist() if grown else []
    found = pq.read_table(run.path(failures), columns=["id", "text", "category"]).to_pylist()
    return [{**row, "split": VAULT_SPLIT} for row in grow(old, found, found_in)]


def vault(
    run: RunDir,
    *,
    stage: str,
    attacks: list[dict[str, Any]],
    out: str,
    answers: str,
    found_in: int,
    config: Config,
    model: ModelSection,
) -> dict[str, Any]:
    """Run (or skip, if done) the vault stage: ``attacks`` (:func:`vault_attacks` after iteration
    ``found_in``) written to ``out``; their judged answers read from ``answers`` when the
    evaluation answered them (``evaluate.AlsoAnswer``), else answered here and written there."""

    def work() -> dict[str, Any]:
        rows = [{key: row[key] for key in VAULT_SCHEMA.names} for row in attacks]
        write_parquet(run.path(out), pa.Table.from_pylist(rows, schema=VAULT_SCHEMA))
        if run.path(answers).exists():
            judged = pq.read_table(run.path(answers)).to_pylist()
        else:
            judged = answer_and_judge(attacks, config, model, stage) if attacks else []
            write_parquet(run.path(answers), answers_table(judged, ANSWER_COLUMNS))
        return {
            "new": sum(row["found_in"] == found_in for row in rows),
            **success_summary(judged, config.evaluate.judge.unsafe_threshold),
            "response_tokens": sum(int(row["response_tokens"]) for row in judged),
        }

    return run.run_stage(stage, [out, answers], work)
