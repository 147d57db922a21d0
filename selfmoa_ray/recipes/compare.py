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
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from selfmoa_ray import console
from selfmoa_ray.config import Config
from selfmoa_ray.layout import BASELINE
from selfmoa_ray.recipes.pt_align import run_pt_align
from selfmoa_ray.recipes.selfmoa import run_selfmoa
from selfmoa_ray.report.collect import start_against
from selfmoa_ray.report.gains import run_gains
from selfmoa_ray.rundir import RunDir, atomic_path, atomic_write
from selfmoa_ray.sources.human_seeds import load_human_seeds

RECIPES: dict[str, Callable[[Config, RunDir], dict[str, Any]]] = {
    "selfmoa": run_selfmoa,
    "pt_align": run_pt_align,
    "combined": run_selfmoa,  # the loop, its config's run.recipe says combined
}
# Row column -> the headline metric it shows (report/collect.start_against): the value, its
# interval, the change from the start policy and the paired interval of that change.
METRICS = {
    "harmful_safety": "harmful/safety_rate",
    "harmful_strict_refusal": "harmful/strict_refusal_rate",
    "harmful_string_refusal": "harmful/string_refusal_rate",
    "over_refusal": "benign/over_refusal",
    "helpfulness": "benign/helpfulness",
}
PARTS = ("", "_interval", "_delta", "_delta_interval")
COLUMNS = (
    *("recipe", "policy", "verdict"),
    *(f"{metric}{part}" for metric in METRICS for part in PARTS),
    *("human_items", "prompts", "training_examples", "wall_seconds", "run_dir"),
)


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
    for name in names:
        with_recipe(config, name)  # the loop's recipes refuse a loss they cannot train
    if {"pt_align", "combined"} & set(names):
        load_human_seeds(config.pt_align.seeds, config.pt_align.max_human_items)


def with_recipe(config: Config, name: str) -> Config:
    """``config`` with ``run.recipe`` set to the recipe ``name`` (validated again)."""
    data = config.to_dict()
    data["run"]["recipe"] = name
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"recipe {name}: {err.errors()[0]['msg']}") from None


def adopt_baseline(source: RunDir, target: RunDir) -> bool:
    """Copy the start policy's evaluation from ``source`` into ``target`` (once, atomically).

    Only between runs of one config (but for its recipe), whose baselines would be identical;
    returns whether it
    copied. The stage entry keeps its original wall time, so each recipe's totals include it.
    """
    stage = f"{BASELINE}/evaluate"
    if target.is_done(stage) or not source.is_done(stage):
        return False
    if with_recipe(source.config(), "selfmoa") != with_recipe(target.config(), "selfmoa"):
        raise ValueError("adopt_baseline: the two runs have different configs")
    with atomic_path(target.path(BASELINE)) as tmp:
        shutil.copytree(source.path(BASELINE), tmp)
    entry = dict(source.manifest["stages"][stage])
    entry["adopted_from"] = str(source.root)
    target.manifest["stages"][stage] = entry
    target.save()
    return True


def verdict(loop: dict[str, Any], last: str) -> str:
    """What the recipe's acceptance checks (recipes/selfmoa.py) made of the policies it trained,
    ``last`` being the last one."""
    reason = loop.get("stop_reason")
    because = f": {reason}" if reason else ""
    final = loop.get("final_policy")
    if last == BASELINE:
        return f"not trained{because}"
    if final == last:
        return "accepted"
    if final in (None, BASELINE):
        return f"rejected{because} (the start policy is kept)"
    return f"accepted {final}; {last} rejected{because}"


def shown_policy(loop: dict[str, Any], last: str) -> str:
    """The policy a row shows: the one the recipe keeps, or, when it kept the start policy after
    training, the rejected one, so that the row says what training did."""
    final = loop.get("final_policy")
    return last if final in (None, BASELINE) else final


def comparison_row(recipe: str, collected: dict[str, Any]) -> dict[str, Any]:
    """One recipe's row: its policy against the start policy (paired intervals), and its cost."""
    policies, run = collected["policies"], collected["run"]
    loop, totals = collected.get("loop") or {}, collected["totals"]
    last = policies[-1]["name"]
    shown = shown_policy(loop, last)
    headline = collected.get("headline") or {}
    if headline.get("after") != shown:  # a rejected policy: the report's headline is the start's

        def gains(before: str, after: str) -> dict[str, Any] | None:
            return run_gains(Path(run["path"]), before, after, run["unsafe_threshold"])

        headline = start_against(policies, shown, gains) or {}
    found = {r["metric"]: r for r in headline.get("rows", [])}
    row: dict[str, Any] = {"recipe": recipe, "policy": shown, "verdict": verdict(loop, last)}
    for column, metric in METRICS.items():
        metric_row = found.get(metric) or {}
        row[column] = metric_row.get("after")
        row[f"{column}_interval"] = metric_row.get("after_interval")
        row[f"{column}_delta"] = metric_row.get("delta")
        row[f"{column}_delta_interval"] = (metric_row.get("paired") or {}).get("interval")
    return row | {
        "human_items": totals.get("human_items"),
        "prompts": totals.get("prompts"),
        "training_examples": totals.get("pairs"),
        "wall_seconds": totals.get("seconds"),
        "run_dir": run["path"],
    }


def run_comparison(
    config: Config, root: Path, recipes: Sequence[str], *, resume: bool = False
) -> list[dict[str, Any]]:
    """Run (or resume) each recipe in ``root/<recipe>``; write and return the comparison rows."""
    check_recipes(config, recipes)
    names = [recipe_name(r) for r in recipes]
    rows, first = [], None
    for name in names:
        recipe_config = with_recipe(config, name)
        run = RunDir.create(root / name, recipe_config, resume=resume)
        if first is not None:
            adopt_baseline(first, run)
        console.current().line(f"\n=== recipe {name} ({run.root}) ===")
        rows.append(comparison_row(name, RECIPES[name](recipe_config, run)))
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
    """A Markdown table of the rows: each value with its 95% interval, then its change from the
    start policy with the paired interval of that change (rates in percent and points)."""

    def cell(row: dict[str, Any], key: str) -> str:
        value, interval = row[key], row[f"{key}_interval"]
        change, change_interval = row[f"{key}_delta"], row[f"{key}_delta_interval"]
        if value is None:
            return "n/a"
        scale, digits, unit = (1, 3, "") if key == "helpfulness" else (100, 1, "%")
        text = f"{scale * value:.{digits}f}{unit}"
        if interval:
            text += f" [{scale * interval[0]:.{digits}f}, {scale * interval[1]:.{digits}f}]"
        text += f"; {scale * (change or 0):+.{digits}f}"
        if change_interval:
            low, high = change_interval
            text += f" [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"
        return text

    header = (
        "| recipe | policy | verdict | harmful judged safe (audit judge) | harmful refused (strict "
        "matcher) | over-refusal (audit judge) | helpfulness | human items | prompts | training "
        "examples | wall time |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        shown = ("harmful_safety", "harmful_strict_refusal", "over_refusal", "helpfulness")
        cells = [cell(row, key) for key in shown]
        lines.append(
            f"| {row['recipe']} | {row['policy']} | {row['verdict']} | {' | '.join(cells)} | "
            f"{row['human_items']} | {row['prompts']} | {row['training_examples']} | "
            f"{(row['wall_seconds'] or 0) / 60:.1f} min |"
        )
    return "\n".join(lines)
