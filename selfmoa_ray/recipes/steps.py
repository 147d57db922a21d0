"""How a recipe runs its stages: each gets its files from the run layout, and a finished stage
prints one line, so a user watching the job sees the loop advance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq

from selfmoa_ray import console
from selfmoa_ray.config import Config
from selfmoa_ray.layout import Iteration
from selfmoa_ray.report.collect import collect_run
from selfmoa_ray.report.tracking import cost_metrics, flat_metrics
from selfmoa_ray.rundir import RunDir


class Steps:
    """Runs one iteration's stages: ``steps("pairs", pairs, section=...)`` calls the stage with
    its name and files from ``Iteration.io("pairs")`` (a keyword given here overrides one) and the
    settings given, prints its line, and returns its manifest entry."""

    def __init__(self, run: RunDir, it: Iteration):
        self.run, self.it = run, it

    def __call__(self, kind: str, stage: Callable[..., dict[str, Any]], /, **kw: Any) -> dict:
        entry = stage(self.run, **{**self.it.io(kind), **kw})
        return stage_done(self.run, entry, self.it.stage(kind))


def stage_done(run: RunDir, entry: dict[str, Any], name: str) -> dict[str, Any]:
    """One line per finished stage, so a user watching the job sees the loop advance; returns
    the stage's manifest entry. The line fits the terminal (the full summary is in the manifest):
    ``[iter_01/judge] done in 9.3s rows=32 unsafe=30 refusals=2``; an evaluation shows each
    split's safety and refusal rates."""
    summary = entry.get("summary", {})
    parts = [f"{k}={_short(v)}" for k, v in summary.items() if not isinstance(v, (dict, list))]
    for split, m in (summary.get("splits") or {}).items():
        if isinstance(m, dict) and "safety_rate" in m:
            parts.append(f"{split}: safety {m['safety_rate']:.1%} refusal {m['refusal_rate']:.1%}")
    status = f"[{name}] {entry.get('status')} in {entry.get('seconds', 0):.1f}s"
    console.current().line(console.fit(" ".join([status, *parts])))
    return entry


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def track_policy(tracker: Any, run: RunDir, step: int, name: str) -> None:
    """The policy's held-out metrics at ``step``, and what the run has cost so far."""
    collected = collect_run(run.root)
    for policy in collected["policies"]:
        if policy["name"] == name:
            tracker.log_iteration(step, flat_metrics(policy) | cost_metrics(collected["cost"]))


def track_training(tracker: Any, run: RunDir, it: Iteration) -> None:
    """Iteration ``it``'s training curves, from the history its train stage names (none when it
    did not train)."""
    history = run.stage_summary(it.stage("train")).get("history")
    if history:
        tracker.log_training(it.t, run.path(history))


def human_items(run: RunDir, config: Config) -> int:
    """Human-written items the loop started from: the seed and benign prompts its red team drew
    on, the messages of ``sampling.guide`` and the ``sampling.prefill``; no human labels."""
    seeds: set[str] = set()
    for path in sorted(run.root.glob("iter_*/prompts.parquet")):
        seeds |= set(pq.read_table(path, columns=["seed_id"]).column("seed_id").to_pylist())
    guide = len(config.sampling.guide or []) + bool(config.sampling.prefill)
    return len(seeds - {""}) + guide
