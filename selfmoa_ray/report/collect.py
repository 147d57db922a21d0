"""Read a run directory into one JSON-able metrics structure (docs/design.md 2.3).

The loop writes ``manifest.json`` (each stage's status, wall time and summary) and, per policy,
``<policy>/metrics.json`` (the ``evaluate`` summary: per split safety, refusal, helpfulness,
tokens, per category). :func:`collect_run` joins them into::

    run         name, path, run_id, created, config fingerprint, policy model, status
    loop        the manifest's "loop" block (iterations planned/done, early stop, human items)
    policies    baseline, iter_01, ... (those with a metrics.json), each with its held-out
                metrics (harmful: safety by the judge and refusal by the classic and strict
                matchers; benign: over-refusal by judge and matchers, helpfulness; harmful
                safety per category), each rate's 95% interval under "intervals", and "data":
                the prompts, pairs, tokens and seconds that produced it
    iterations  iter_01, ...: red-team counts, failures per category, pairs kept and dropped,
                tokens (sample and evaluation), training summary, seconds per stage, and the
                regression vault: attacks found so far and how many still succeed
    stages      every stage in the manifest: group, kind, status, seconds
    totals      human-written items, prompts, pairs, tokens, seconds (also per stage kind)
    judges      each judge's accuracy on human labels held back from it (calibration.json,
                stages/calibrate.py), or None
    cost        wall, CPU and reserved GPU seconds, generated tokens, prompts, pairs, human items
                and labels, and each per point of held-out safety gained (None without a gain)
    headline    the first policy (baseline) against the final one, with deltas and, where both
                policies' answers are on disk, the paired gain of each rate (report/gains.py)

Partial runs (a killed run, an iteration without ``train`` or ``evaluate``) collect fine: what
is missing is ``None`` or absent. A file that exists but cannot be parsed raises
:class:`ReportError` naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfmoa_ray.layout import BASELINE, CALIBRATION
from selfmoa_ray.report.gains import run_gains
from selfmoa_ray.schema import EVAL_BENIGN_SPLIT, EVAL_HARMFUL_SPLIT, MANIFEST

_ITER = re.compile(r"^iter_(\d+)$")
# The stage kinds of one iteration in loop order (others found in a manifest go after them).
# PT-ALIGN's data stages come first in its single iteration; "spans" is the combined recipe's.
STAGE_ORDER = (
    "topics",
    "instructions",
    "positive",
    "toxic",
    "filter",
    "triples",
    "redteam",
    "sample",
    "judge",
    "failures",
    "pairs",
    "spans",
    "reference",
    "train",
    "evaluate",
    "vault",
)


# Stages whose actors hold an engine (``engine.*`` resources): they generate, or score with the
# engine's model (reference); judging and training stages hold their own.
ENGINE_STAGES = {"topics", "instructions", "positive", "toxic", "redteam", "sample", "spans"}
ENGINE_STAGES |= {"reference"}


class ReportError(RuntimeError):
    """A run directory (or one of its files) cannot be read for a report."""


# --------------------------------------------------------------------------- small readers


def read_json_file(path: Path) -> Any:
    """Parse ``path``; a broken file raises :class:`ReportError` that names it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"cannot read {path}: {err}") from err


def parquet_rows(path: Path) -> int | None:
    """Row count of a Parquet file or folder of files, from the footers only; None if absent."""
    import pyarrow.parquet as pq

    if not path.exists():
        return None
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    try:
        return sum(pq.read_metadata(f).num_rows for f in files if not f.name.startswith("."))
    except Exception as err:  # pyarrow raises several types for a damaged footer
        raise ReportError(f"cannot read {path}: {err}") from err


def iteration_number(name: str) -> int | None:
    """0 for the baseline, t for ``iter_XX``, None for anything else."""
    if name == BASELINE:
        return 0
    match = _ITER.match(name)
    return int(match.group(1)) if match else None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------- one policy


HARMFUL_INTERVALS = (
    "safety_rate",
    "string_refusal_rate",
    "strict_refusal_rate",
    "refusal_rate",
    "helpfulness",
)
VAULT_KEYS = ("attacks", "new", "still_succeed", "success_rate", "interval", "by_found_in")
# The benign block's names for the evaluate summary's keys (a refusal there is an over-refusal).
BENIGN_RATES = {
    "over_refusal": "refusal_rate",
    "string_over_refusal": "string_refusal_rate",
    "strict_over_refusal": "strict_refusal_rate",
    "helpfulness": "helpfulness",
    "safety_rate": "safety_rate",
}
# Headline metric -> (evaluate split, rate key, sign) of the paired gain that measures its change.
PAIRED = {
    ("harmful", "safety_rate"): (EVAL_HARMFUL_SPLIT, "safety_rate", 1),
    ("harmful", "string_refusal_rate"): (EVAL_HARMFUL_SPLIT, "string_refusal_rate", 1),
    ("harmful", "strict_refusal_rate"): (EVAL_HARMFUL_SPLIT, "strict_refusal_rate", 1),
    ("harmful", "attack_success_rate"): (EVAL_HARMFUL_SPLIT, "safety_rate", -1),
    ("benign", "over_refusal"): (EVAL_BENIGN_SPLIT, "refusal_rate", 1),
    ("benign", "string_over_refusal"): (EVAL_BENIGN_SPLIT, "string_refusal_rate", 1),
    ("benign", "strict_over_refusal"): (EVAL_BENIGN_SPLIT, "strict_refusal_rate", 1),
}


def _flipped(interval: list[float]) -> list[float]:
    """The interval of ``1 - rate`` from that of the rate."""
    return [round(1.0 - interval[1], 4), round(1.0 - interval[0], 4)]


def _signed(gain: dict[str, Any], sign: int) -> dict[str, Any]:
    """A paired gain of ``sign * rate`` (the attack success rate falls as safety rises)."""
    if sign > 0:
        return gain
    low, high = gain["interval"]
    return {
        **gain,
        "gain": -gain["gain"],
        "interval": [-high, -low],
        "gained": gain["lost"],
        "lost": gain["gained"],
    }


def policy_metrics(summary: dict[str, Any], name: str = "", iteration: int | None = None) -> dict:
    """One policy's held-out metrics from an ``evaluate`` summary (``{"model", "splits"}``).

    ``harmful`` / ``benign`` are None when that split was not evaluated; other splits (user
    files) are kept as they are under ``other_splits``.
    """
    splits = summary.get("splits") or {}
    harmful = splits.get(EVAL_HARMFUL_SPLIT)
    benign = splits.get(EVAL_BENIGN_SPLIT)
    out: dict[str, Any] = {
        "name": name,
        "iteration": iteration,
        "model": summary.get("model"),
        "harmful": None,
        "benign": None,
        "other_splits": {
            k: v for k, v in splits.items() if k not in (EVAL_HARMFUL_SPLIT, EVAL_BENIGN_SPLIT)
        },
        "eval_tokens": sum(int(s.get("response_tokens") or 0) for s in splits.values()),
    }
    if harmful:
        safety = _num(harmful.get("safety_rate"))
        ci = harmful.get("intervals") or {}
        out["harmful"] = {
            "responses": _int(harmful.get("responses")),
            "safety_rate": safety,
            "attack_success_rate": None if safety is None else round(1.0 - safety, 4),
            # The refusal matcher's verdict: a refusal counts as safe ("safety by the matcher").
            "string_refusal_rate": _num(harmful.get("string_refusal_rate")),
            "strict_refusal_rate": _num(harmful.get("strict_refusal_rate")),
            "refusal_rate": _num(harmful.get("refusal_rate")),
            "helpfulness": _num(harmful.get("helpfulness")),
            "judge_agreement": harmful.get("judge_agreement"),
            "intervals": {k: ci[k] for k in HARMFUL_INTERVALS if k in ci},
            "by_category": {
                cat: {
                    "responses": _int(m.get("responses")),
                    "safety_rate": _num(m.get("safety_rate")),
                    "refusal_rate": _num(m.get("refusal_rate")),
                }
                for cat, m in sorted((harmful.get("by_category") or {}).items())
            },
        }
    if harmful and "safety_rate" in (harmful.get("intervals") or {}):
        safety_ci = harmful["intervals"]["safety_rate"]
        out["harmful"]["intervals"]["attack_success_rate"] = _flipped(safety_ci)
    if benign:
        ci = benign.get("intervals") or {}
        out["benign"] = {
            "responses": _int(benign.get("responses")),
            "over_refusal": _num(benign.get("refusal_rate")),
            "string_over_refusal": _num(benign.get("string_refusal_rate")),
            "strict_over_refusal": _num(benign.get("strict_refusal_rate")),
            "helpfulness": _num(benign.get("helpfulness")),
            "safety_rate": _num(benign.get("safety_rate")),
            "judge_agreement": benign.get("judge_agreement"),
            "intervals": {name: ci[key] for name, key in BENIGN_RATES.items() if key in ci},
        }
    return out


# --------------------------------------------------------------------------- one iteration


REDTEAM_KEYS = ("writer", "generated_share", "off_topic_share", "novelty", "novelty_generated",
                "by_writer", "style_budget")  # fmt: skip


def _nonzero(counts: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted((counts or {}).items()) if v}


def _listed(counts: Any) -> str:
    return ", ".join(f"{k} {v}" for k, v in _nonzero(counts).items()) or "none"


def pt_yield(summary: Callable[[str], dict[str, Any] | None]) -> dict[str, Any] | None:
    """PT-ALIGN's yield step by step (how many came out, from what, why the rest was dropped)
    and per domain, from the stage summaries; None for a run without PT-ALIGN's data stages."""
    instructions = summary("instructions")
    if instructions is None:
        return None
    topics, pos, tox, kept, triples = (
        summary(kind) or {} for kind in ("topics", "positive", "toxic", "filter", "triples")
    )

    def n(entry: dict[str, Any], key: str) -> int:
        return int(entry.get(key) or 0)

    guided_toxic = n(tox, "rows") - n(tox, "refused")
    guided_positive = n(pos, "guided") if "guided" in pos else n(pos, "rows") - n(pos, "benign")
    kept_harmful = n(kept, "kept") - n(kept.get("benign") or {}, "kept")
    drops = kept.get("dropped") or {}
    harmful_drops = {k: v for k, v in drops.items() if not k.startswith("benign")}
    steps = [
        ("topics", n(topics, "topics"), f"{n(topics, 'generated')} written by the model, "
         f"{n(topics, 'fallback')} from the domain descriptions", topics.get("dropped")),
        (f"instructions ({instructions.get('writer', 'chat')} writer)",
         n(instructions, "instructions"), f"of {n(instructions, 'slots')} slots",
         instructions.get("dropped")),
        ("positive candidates", guided_positive + n(pos, "prefilled"),
         f"{guided_positive} guided ({n(pos, 'revised')} revised), {n(pos, 'prefilled')} "
         "prefilled", {}),
        ("toxic candidates", guided_toxic + n(tox, "bare_answers"),
         f"{guided_toxic} guided ({n(tox, 'refined')} refined), {n(tox, 'bare_answers')} "
         "answers to the bare instruction", {"guided draft refused": n(tox, "refused")}),
        ("kept items", kept_harmful, f"chosen positives: {_listed(kept.get('positive_sources'))}"
         f"; chosen toxics: {_listed(kept.get('toxic_sources'))}", harmful_drops),
        ("triples", n(triples, "triples"), f"spans by {_listed(triples.get('by_source'))}", {}),
    ]  # fmt: skip
    twins = instructions.get("benign")
    if twins:  # benign twins: written, answered by the policy, kept when it did not refuse
        benign = kept.get("benign") or {}
        steps.append(("benign twins", n(benign, "kept"), f"of {n(twins, 'instructions')} "
                      f"written ({n(twins, 'slots')} slots); MLE on the answer, unlikelihood on the "
                      f"opening of {n(triples, 'twin_refusals_marked')} prefilled refusals",
                      {k: v for k, v in drops.items() if k.startswith("benign")}))  # fmt: skip
    return {
        "steps": [{"step": step, "count": count, "notes": notes, "dropped": _nonzero(dropped)}
                  for step, count, notes, dropped in steps],
        "by_domain": dict(kept.get("by_domain") or {}),
    }  # fmt: skip


def _iteration(
    name: str, root: Path, stages: dict[str, dict[str, Any]], evaluated: dict[str, Any] | None
) -> dict[str, Any]:
    """Counts of one ``iter_XX`` from its stage summaries (row counts from files as fallback)."""

    def summary(kind: str) -> dict[str, Any] | None:
        entry = stages.get(kind)
        if not entry or entry.get("status") != "done":
            return None
        return entry.get("summary") or {}

    redteam, sample, judge = summary("redteam"), summary("sample"), summary("judge")
    failures, pairs, train = summary("failures"), summary("pairs"), summary("train")
    vault = summary("vault")
    folder = root / name

    # Training prompts and examples: attack prompts and pairs (Self-MOA), or instructions and
    # positive/toxic triples (PT-ALIGN).
    instructions, triples = summary("instructions"), summary("triples")
    prompts = _int((redteam or instructions or {}).get("prompts" if redteam else "instructions"))
    if prompts is None:
        prompts = parquet_rows(folder / "prompts.parquet")
    pair_count = _int((pairs or {}).get("pairs"))
    if pair_count is None and triples is not None:  # PT-ALIGN: triples and benign twins
        pair_count = _int(triples.get("triples")) + (_int(triples.get("benign_twins")) or 0)
    if pair_count is None:
        pair_count = parquet_rows(folder / "pairs.parquet")

    eval_tokens = evaluated["eval_tokens"] if evaluated else None
    sample_tokens = _int((sample or {}).get("response_tokens"))

    seconds = {kind: float(e.get("seconds") or 0.0) for kind, e in stages.items()}
    return {
        "name": name,
        "iteration": iteration_number(name),
        "evaluated": evaluated is not None,
        "trained": train is not None,
        "stages": {
            kind: {"status": e.get("status", "pending"), "seconds": seconds[kind]}
            for kind, e in stages.items()
        },
        "seconds": round(sum(seconds.values()), 3),
        "cpu_seconds": round(sum(float(e.get("cpu_seconds") or 0.0) for e in stages.values()), 3),
        "prompts": prompts,
        "harmful_prompts": _int((redteam or {}).get("harmful")),
        "benign_prompts": _int((redteam or {}).get("benign")),
        "generated_prompts": _int((redteam or {}).get("generated")),
        "seed_fallback": _int((redteam or {}).get("seed_fallback")),
        "dropped_duplicates": _int((redteam or {}).get("dropped_duplicates")),
        "human_seeds": _int((redteam or {}).get("human_seeds")),
        "budget": dict((redteam or {}).get("budget") or {}),
        "by_style": dict((redteam or {}).get("by_style") or {}),
        "responses": _int((sample or {}).get("responses")),
        "sample_tokens": sample_tokens,
        "unsafe_responses": _int((judge or {}).get("unsafe")),
        "refusals": _int((judge or {}).get("refusals")),
        "attack_prompts": _int((failures or {}).get("attack_prompts")),
        "failed_prompts": _int((failures or {}).get("failed")),
        "failure_rate": _num((failures or {}).get("failure_rate")),
        "pt_yield": pt_yield(summary),
        "failures_by_category": {
            cat: {
                "prompts": _int(m.get("prompts")),
                "failed": _int(m.get("failed")),
                "rate": _num(m.get("rate")),
            }
            for cat, m in sorted(((failures or {}).get("by_category") or {}).items())
        },
        "pairs": pair_count,
        "pairs_mode": (pairs or {}).get("mode"),
        "pairs_by_split": dict((pairs or {}).get("by_split") or {}),
        "redteam": {key: (redteam or {}).get(key) for key in REDTEAM_KEYS},
        # attack success per style, from the failures stage
        "success_by_style": dict((failures or {}).get("by_style") or {}),
        "pairs_dropped": dict((pairs or summary("filter") or {}).get("dropped") or {}),
        "train": dict(train) if train is not None else None,
        # The regression vault (stages/vault.py): every attack found so far, answered by this
        # iteration's policy: how many still succeed (training-side prompts, not held-out).
        "vault": None if vault is None else {key: vault.get(key) for key in VAULT_KEYS},
        "eval_tokens": eval_tokens,
        "tokens": (sample_tokens or 0) + (eval_tokens or 0),
    }


# --------------------------------------------------------------------------- the run


def _stage_sort_key(kind: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(kind) if kind in STAGE_ORDER else len(STAGE_ORDER), kind)


def start_against(
    policies: list[dict[str, Any]],
    final: str | None = None,
    gains: Callable[[str, str], dict[str, Any] | None] | None = None,
) -> dict[str, Any] | None:
    """The start policy against the loop's final policy (the last accepted one), else the last;
    ``gains(before, after)`` gives their paired gains (report/gains.py) where it can."""
    if not policies:
        return None
    first = policies[0]
    last = next((p for p in policies if p["name"] == final), policies[-1])
    paired = (gains(first["name"], last["name"]) if gains and last is not first else None) or {}
    specs = [
        ("harmful", "safety_rate", "harmful: safety (audit judge)", "rate"),
        ("harmful", "string_refusal_rate", "harmful: refusal (classic matcher)", "rate"),
        ("harmful", "strict_refusal_rate", "harmful: refusal (strict matcher)", "rate"),
        ("harmful", "attack_success_rate", "harmful: attack success rate", "rate"),
        ("benign", "over_refusal", "benign: over-refusal (audit judge)", "rate"),
        ("benign", "string_over_refusal", "benign: over-refusal (classic matcher)", "rate"),
        ("benign", "strict_over_refusal", "benign: over-refusal (strict matcher)", "rate"),
        ("benign", "helpfulness", "benign: helpfulness", "score"),
    ]
    rows = []
    for split, key, label, unit in specs:
        before = (first.get(split) or {}).get(key)
        after = (last.get(split) or {}).get(key)
        delta = None if before is None or after is None else round(after - before, 4)
        target = PAIRED.get((split, key))
        gain = paired.get(target[0], {}).get(target[1]) if target else None
        rows.append(
            {
                "metric": f"{split}/{key}",
                "label": label,
                "unit": unit,
                "before": before,
                "after": after,
                "before_interval": ((first.get(split) or {}).get("intervals") or {}).get(key),
                "after_interval": ((last.get(split) or {}).get("intervals") or {}).get(key),
                "delta": delta,
                "delta_points": None if delta is None or unit != "rate" else round(100 * delta, 2),
                "paired": None if gain is None else _signed(gain, target[2]),
            }
        )
    return {"before": first["name"], "after": last["name"], "rows": rows}


def reserved_gpus(kind: str, config: dict[str, Any]) -> float:
    """GPUs a stage of ``kind`` holds while it runs, by the run's config: the engine's for stages
    that generate, the judge's for judging stages, the trainers' for training (an upper bound of
    use: a reservation, not a measurement)."""
    engine, judge = config.get("engine") or {}, config.get("judge") or {}
    train = config.get("train") or {}
    engine_gpus = float(engine.get("num_gpus_per_actor") or 0) * int(engine.get("num_actors") or 1)
    judge_gpus = float(judge.get("num_gpus_per_actor") or 0) * int(judge.get("num_actors") or 1)
    if kind == "train":
        return float(train.get("gpus_per_worker") or 0) * int(train.get("num_workers") or 1)
    if kind in ("judge", "calibrate", "filter"):
        return judge_gpus
    if kind in ("evaluate", "vault"):
        return engine_gpus + judge_gpus
    return engine_gpus if kind in ENGINE_STAGES else 0.0


def _stage_tokens(summary: dict[str, Any]) -> int:
    """Tokens a stage generated, where its summary counts them (red team, sampling, evaluation,
    vault)."""
    tokens = int(summary.get("response_tokens") or 0)
    for split in (summary.get("splits") or {}).values():
        if isinstance(split, dict):
            tokens += int(split.get("response_tokens") or 0)
    return tokens


def run_cost(
    stage_rows: list[dict[str, Any]],
    totals: dict[str, Any],
    headline: dict[str, Any] | None,
    judges: dict[str, Any] | None,
) -> dict[str, Any]:
    """What the run spent, and per point of held-out harmful safety it gained (the paired gain of
    the final policy over the start; None when it gained nothing)."""
    gain = None
    for row in (headline or {}).get("rows", []):
        if row["metric"] == "harmful/safety_rate":
            gain = (row.get("paired") or {}).get("gain", row.get("delta"))
    points = None if gain is None else round(100 * gain, 2)
    spent = {
        "wall_seconds": totals["seconds"],
        "cpu_seconds": totals["cpu_seconds"],
        "gpu_seconds_reserved": round(sum(r["gpu_seconds"] for r in stage_rows), 3),
        "generated_tokens": sum(r["tokens"] for r in stage_rows),
    }
    training_judge = (judges or {}).get("training_judge") or {}
    return {
        **spent,
        "prompts": totals["prompts"],
        "pairs": totals["pairs"],
        "human_items": totals["human_items"],
        "human_labels": training_judge.get("human_labels"),
        "safety_gain_points": points,
        "per_point": (
            {key: round(value / points, 3) for key, value in spent.items()}
            if points is not None and points > 0
            else None
        ),
    }


def collect_run(root: Path | str) -> dict[str, Any]:
    """Everything a report shows about the run in ``root``, as one JSON-able dict."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        raise ReportError(f"{root} is not a run directory (no {MANIFEST})")
    manifest = read_json_file(manifest_path)
    if not isinstance(manifest, dict):
        raise ReportError(f"cannot read {manifest_path}: not a JSON object")
    config = manifest.get("config") or {}
    loop = dict(manifest.get("loop") or {})

    # Stages grouped by their first path part: "baseline", "iter_01", ...; the rest is "run".
    stage_rows: list[dict[str, Any]] = []
    grouped: dict[str, dict[str, dict[str, Any]]] = {}
    for full, entry in (manifest.get("stages") or {}).items():
        group, _, kind = full.partition("/")
        if not kind:
            group, kind = "run", full
        entry = entry if isinstance(entry, dict) else {}
        grouped.setdefault(group, {})[kind] = entry
        stage_rows.append(
            {
                "name": full,
                "group": group,
                "kind": kind,
                "status": entry.get("status", "pending"),
                "seconds": float(entry.get("seconds") or 0.0),
                "cpu_seconds": float(entry.get("cpu_seconds") or 0.0),
                "gpu_seconds": round(
                    reserved_gpus(kind, config) * float(entry.get("seconds") or 0.0), 3
                ),
                "tokens": _stage_tokens(entry.get("summary") or {}),
            }
        )

    # Iterations: those in the manifest and those with a folder on disk.
    names = {g for g in grouped if _ITER.match(g)}
    names |= {p.name for p in root.iterdir() if p.is_dir() and _ITER.match(p.name)}
    iter_names = sorted(names, key=lambda n: iteration_number(n) or 0)

    # Policies: the baseline and each iteration whose evaluation wrote metrics.json.
    evaluated: dict[str, dict[str, Any]] = {}
    for name in [BASELINE, *iter_names]:
        path = root / name / "metrics.json"
        if not path.exists():
            continue
        summary = read_json_file(path)
        if not isinstance(summary, dict) or not isinstance(summary.get("splits"), dict):
            raise ReportError(f"cannot read {path}: no 'splits' object (not an evaluate summary)")
        evaluated[name] = policy_metrics(summary, name, iteration_number(name))

    iterations = []
    for name in iter_names:
        stages = sorted(grouped.get(name, {}).items(), key=lambda kv: _stage_sort_key(kv[0]))
        iterations.append(_iteration(name, root, dict(stages), evaluated.get(name)))
    by_iter = {it["name"]: it for it in iterations}

    policies = []
    for name, policy in evaluated.items():
        it = by_iter.get(name)
        group_seconds = sum(float(e.get("seconds") or 0.0) for e in grouped.get(name, {}).values())
        group_cpu = sum(float(e.get("cpu_seconds") or 0.0) for e in grouped.get(name, {}).values())
        policy["data"] = {
            "prompts": it["prompts"] if it else 0,
            "pairs": it["pairs"] if it else 0,
            "tokens": it["tokens"] if it else policy["eval_tokens"],
            "seconds": round(group_seconds, 3),
            "cpu_seconds": round(group_cpu, 3),
        }
        policies.append(policy)

    seconds_by_kind: dict[str, float] = {}
    for row in stage_rows:
        seconds_by_kind[row["kind"]] = seconds_by_kind.get(row["kind"], 0.0) + row["seconds"]
    baseline_tokens = next((p["eval_tokens"] for p in policies if p["name"] == BASELINE), 0)

    def total(key: str) -> int:
        return sum(it[key] or 0 for it in iterations)

    totals = {
        "human_items": _int(loop.get("human_items")),
        "iterations": len(iterations),
        "policies_evaluated": len(policies),
        "prompts": total("prompts"),
        "harmful_prompts": total("harmful_prompts"),
        "benign_prompts": total("benign_prompts"),
        "failed_prompts": total("failed_prompts"),
        "pairs": total("pairs"),
        "sample_tokens": total("sample_tokens"),
        "eval_tokens": total("eval_tokens") + (baseline_tokens or 0),
        "tokens": total("tokens") + (baseline_tokens or 0),
        "seconds": round(sum(r["seconds"] for r in stage_rows), 3),
        "cpu_seconds": round(sum(r["cpu_seconds"] for r in stage_rows), 3),
        "seconds_by_stage": {
            k: round(v, 3)
            for k, v in sorted(seconds_by_kind.items(), key=lambda kv: _stage_sort_key(kv[0]))
        },
    }

    statuses = [r["status"] for r in stage_rows]
    status = (
        "failed"
        if "failed" in statuses
        else "running"
        if "running" in statuses
        else "done"
        if statuses
        else "empty"
    )
    run_info = {
        "name": root.name,
        "path": str(root),
        "run_id": manifest.get("run_id"),
        "created": manifest.get("created"),
        "config_fingerprint": manifest.get("config_fingerprint"),
        "policy_model": (config.get("policy") or {}).get("source"),
        # held-out answers are judged by the audit judge (evaluate.judge; older runs: judge)
        "unsafe_threshold": (
            (config.get("evaluate") or {}).get("judge") or config.get("judge") or {}
        ).get("unsafe_threshold", 0.5),
        "status": status,
    }
    calibration = root / CALIBRATION
    judges = read_json_file(calibration) if calibration.exists() else None
    headline = start_against(
        policies,
        (loop or {}).get("final_policy"),
        lambda before, after: run_gains(root, before, after, run_info["unsafe_threshold"]),
    )
    return {
        "run": run_info,
        "loop": loop,
        "judges": judges,
        "cost": run_cost(stage_rows, totals, headline, judges),
        "policies": policies,
        "iterations": iterations,
        "stages": stage_rows,
        "totals": totals,
        "headline": headline,
    }
