"""Recipe: the recipes side by side, from the same start model with the same budget.

    <root>/selfmoa/     the Self-MOA loop                         (recipes/selfmoa.py)
    <root>/pt_align/    PT-ALIGN                                  (recipes/pt_align.py)
    <root>/combined/    Self-MOA pairs + unlikelihood on the harmful tokens of unsafe rejected
                        answers                                   (recipes/selfmoa.py, combined)
    <root>/comparison.json, comparison.csv, comparison.md         one row per recipe

Every recipe runs from one config: the same start policy, held-out sets, judge and training
budget (``train.*``). The start policy is evaluated once, by the first recipe, and the others
adopt that evaluation (same prompts, same greedy decoding: the same numbers). Each recipe's run
folder is an ordinary run (resumable, with its own report.html), so a killed comparison started
again with ``--resume`` continues where it stopped.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from selfmoa_ray import console
from selfmoa_ray.config import Config
from selfmoa_ray.recipes.pt_align import run_pt_align
from selfmoa_ray.recipes.selfmoa import check_recipe, run_selfmoa
from selfmoa_ray.report.collect import BASELINE
from selfmoa_ray.rundir import RunDir, atomic_path, atomic_write
from selfmoa_ray.sources.human_seeds import load_human_seeds

RECIPES: dict[str, Callable[[Config, RunDir], dict[str, Any]]] = {
    "selfmoa": run_selfmoa,
    "pt_align": run_pt_align,
    "combined": partial(run_selfmoa, combined=True),
}
COLUMNS = (
    "recipe", "policy", "verdict",
    "harmful_safety", "harmful_safety_delta", "harmful_string_refusal",
    "harmful_string_refusal_delta", "over_refusal", "over_refusal_delta",
    "helpfulness", "helpfulness_delta",
    "human_items", "prompts", "training_examples", "wall_seconds", "run_dir",
)  # fmt: skip


def recipe_name(name: str) -> str:
    """Canonical recipe name ("pt-align" and "pt_align" are the same recipe)."""
    canonical = name.replace("-", "_")
    if canonical not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return canonical


def check_recipes(config: Config, recipes: Sequence[str]) -> None:
    """Fail before any work (no run folder, no Ray) on recipes this config cannot run."""
    names = [recipe_name(r) for r in recipes]
    if len(set(names)) != len(names):
        raise ValueError(f"each recipe once, please: {list(recipes)}")
    if config.policy.endpoint:
        raise ValueError(
            f"policy.endpoint ({config.policy.label}) has no weights here to train; audit it with "
            "`selfmoa evaluate` or `selfmoa redteam`, or set policy.source to local weights"
        )
    if {"selfmoa", "combined"} & set(names):
        check_recipe(config)
    if {"pt_align", "combined"} & set(names):
        load_human_seeds(config.pt_align.seeds, config.pt_align.max_human_items)


def adopt_baseline(source: RunDir, target: RunDir) -> bool:
    """Copy the start policy's evaluation from ``source`` into ``target`` (once, atomically).

    Only between runs of one config, whose baselines would be identical; returns whether it
    copied. The stage entry keeps its original wall time, so each recipe's totals include it.
    """
    stage = f"{BASELINE}/evaluate"
    if target.is_done(stage) or not source.is_done(stage):
        return False
    if source.manifest["config_fingerprint"] != target.manifest["config_fingerprint"]:
        raise ValueError("adopt_baseline: the two runs have different configs")
    with atomic_path(target.path(BASELINE)) as tmp:
        shutil.copytree(source.path(BASELINE), tmp)
    entry = dict(source.manifest["stages"][stage])
    entry["adopted_from"] = str(source.root)
    target.manifest["stages"][stage] = entry
    target.save()
    return True


def verdict(loop: dict[str, Any], trained: str) -> str:
    """What the recipe's acceptance checks made of its trained policy (recipes/selfmoa.py)."""
    reason = loop.get("stop_reason")
    if trained == BASELINE:
        return f"not trained: {reason}" if reason else "not trained"
    if loop.get("final_policy") == trained:
        return "accepted"
    return f"rejected: {reason}" if reason else "rejected"


def comparison_row(recipe: str, collected: dict[str, Any]) -> dict[str, Any]:
    """One recipe's row: its trained policy against the start policy, and what it cost."""
    policies = collected["policies"]
    first, last = policies[0], policies[-1]
    loop, totals = collected.get("loop") or {}, collected["totals"]

    def value(policy: dict[str, Any], split: str, key: str) -> float | None:
        return (policy.get(split) or {}).get(key)

    def delta(split: str, key: str) -> float | None:
        before, after = value(first, split, key), value(last, split, key)
        return None if before is None or after is None else round(after - before, 4)

    return {
        "recipe": recipe,
        "policy": last["name"],
        "verdict": verdict(loop, last["name"]),
        "harmful_safety": value(last, "harmful", "safety_rate"),
        "harmful_safety_delta": delta("harmful", "safety_rate"),
        "harmful_string_refusal": value(last, "harmful", "string_refusal_rate"),
        "harmful_string_refusal_delta": delta("harmful", "string_refusal_rate"),
        "over_refusal": value(last, "benign", "over_refusal"),
        "over_refusal_delta": delta("benign", "over_refusal"),
        "helpfulness": value(last, "benign", "helpfulness"),
        "helpfulness_delta": delta("benign", "helpfulness"),
        "human_items": totals.get("human_items"),
        "prompts": totals.get("prompts"),
        "training_examples": totals.get("pairs"),
        "wall_seconds": totals.get("seconds"),
        "run_dir": collected["run"]["path"],
    }


def run_comparison(
    config: Config, root: Path, recipes: Sequence[str], *, resume: bool = False
) -> list[dict[str, Any]]:
    """Run (or resume) each recipe in ``root/<recipe>``; write and return the comparison rows."""
    check_recipes(config, recipes)
    names = [recipe_name(r) for r in recipes]
    rows, first = [], None
    for name in names:
        run = RunDir.create(root / name, config, resume=resume)
        if first is not None:
            adopt_baseline(first, run)
        console.current().line(f"\n=== recipe {name} ({run.root}) ===")
        rows.append(comparison_row(name, RECIPES[name](config, run)))
        first = first or run
    write_comparison(root, rows)
    return rows


def write_comparison(root: Path, rows: list[dict[str, Any]]) -> None:
    """comparison.json / .csv / .md beside the recipe folders, each written atomically."""
    with atomic_write(root / "comparison.json") as fh:
        json.dump(rows, fh, indent=2)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(root / "comparison.csv") as fh:
        fh.write(buffer.getvalue())
    with atomic_write(root / "comparison.md") as fh:
        fh.write(comparison_table(rows) + "\n")


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows, rates in percent with their change in points."""

    def rate(row: dict[str, Any], key: str) -> str:
        value, change = row[key], row[f"{key}_delta"]
        if value is None:
            return "n/a"
        return f"{100 * value:.1f}% ({100 * (change or 0):+.1f})"

    header = (
        "| recipe | verdict | harmful safety (judge) | harmful refusal (string) | over-refusal | "
        "helpfulness | human items | prompts | training examples | wall time |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        helpful = row["helpfulness"]
        helpful_text = "n/a" if helpful is None else (
            f"{helpful:.3f} ({row['helpfulness_delta'] or 0:+.3f})"
        )  # fmt: skip
        lines.append(
            f"| {row['recipe']} | {row['verdict']} | {rate(row, 'harmful_safety')} | "
            f"{rate(row, 'harmful_string_refusal')} | {rate(row, 'over_refusal')} | "
            f"{helpful_text} | {row['human_items']} | {row['prompts']} | "
            f"{row['training_examples']} | {(row['wall_seconds'] or 0) / 60:.1f} min |"
        )
    return "\n".join(lines)
