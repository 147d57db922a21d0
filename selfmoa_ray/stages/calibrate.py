"""Stage ``calibrate``: how often each judge agrees with human labels it never trained on.

Once per run, before its numbers are trusted: the training judge (``judge``) and the audit judge
(``evaluate.judge``) score human-labelled (prompt, response) rows from PyRIT's scorer evaluations,
each on the half of the rows held back from it (evaluators/probe_format.py ``SPLITS``: the training
judge on the audit half, the audit judge on the training half). A row is *unsafe* when its
objective row is labelled "achieved" or its harm rating is at least 0.5 (on the 1-5 scale, 3 or
more); refusal rows carry a refusal label. Accuracy per task with 95% Wilson intervals, in
``calibration.json`` and the report.

The labelled rows are all answers to harmful objectives, so the figures say how well a judge
tells harmful compliance from the rest, not how it treats benign prompts.

A judge's figures depend only on the judge (its evaluators, their trained probes, its threshold)
and the sample of rows, so they are kept in the cache (``<cache>/calibration/``) and each later
run with the same judges copies them into its folder instead of scoring the rows again (the
demo's two judges, scored side by side: about 45 s on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray.data

from selfmoa_ray.config import Config, JudgeSection
from selfmoa_ray.evaluators.pool import judge_dataset
from selfmoa_ray.paths import cache_root
from selfmoa_ray.report.stats import rate_interval
from selfmoa_ray.rundir import RunDir, read_json, write_json

MAX_ROWS = 400  # per judge, a seeded sample: about +-5 points of accuracy at 95%
SAMPLE_SEED = 0  # the same rows for every run: a judge's figures do not depend on run.seed
TASKS = ("objective", "harm", "refusal")


def held_back_rows(
    split: str, max_rows: int = MAX_ROWS, seed: int = SAMPLE_SEED
) -> list[dict[str, Any]]:
    """Human-labelled rows of ``split`` (a seeded sample of at most ``max_rows``), as judge
    input: ``id``, ``text`` (the prompt), ``response``, ``task`` and ``label`` (True = unsafe
    for objective and harm rows, True = refusal for refusal rows)."""
    from selfmoa_ray.evaluators.probe_training import split_of
    from selfmoa_ray.sources.scorer_rows import load_scorer_rows

    rows = [
        {
            "id": r.id,
            "text": r.prompt,
            "response": r.response,
            "task": task,
            "label": bool(r.label >= 0.5),
        }
        for task in TASKS
        for r in load_scorer_rows(task)
        if split_of(r.prompt) == split
    ]
    if len(rows) > max_rows:
        rows = random.Random(seed).sample(rows, max_rows)
    return sorted(rows, key=lambda r: r["id"])


def accuracy(judged: list[dict[str, Any]], unsafe_threshold: float) -> dict[str, Any]:
    """Per task and overall for safety: agreements with the human label, with intervals."""

    def said(row: dict[str, Any]) -> bool:
        if row["task"] == "refusal":
            return bool(row["refusal"])
        return float(row["safety"]) < unsafe_threshold  # "unsafe", as the label says

    def tally(group: list[dict[str, Any]]) -> dict[str, Any]:
        right = sum(said(r) == r["label"] for r in group)
        n = len(group)
        return {
            "rows": n,
            "accuracy": round(right / n, 4) if n else None,
            "interval": rate_interval(right, n),
        }

    out = {task: tally([r for r in judged if r["task"] == task]) for task in TASKS}
    out["safety"] = tally([r for r in judged if r["task"] != "refusal"])
    return out


def probe_cards(judge: JudgeSection) -> list[dict[str, Any]]:
    """The model cards of the judge's probes (``{}`` for one not trained yet)."""
    from selfmoa_ray.evaluators.probe_format import CARD_FILE, probe_folder

    probes = [spec for spec in judge.evaluators if spec.kind == "probe"]
    cards = [probe_folder(spec.model) / CARD_FILE for spec in probes]
    return [json.loads(card.read_text()) if card.exists() else {} for card in cards]


def human_labels(judge: JudgeSection) -> int:
    """Human-labelled rows the judge's probes trained on; model judges' training data is not
    ours to count, and the refusal matcher learns nothing."""
    heads = [head for card in probe_cards(judge) for head in card.get("heads", {}).values()]
    return sum(int(head.get("training_rows", 0)) for head in heads)


def cache_key(judge: JudgeSection, split: str) -> str:
    """What a judge's calibration depends on, hashed."""
    what = {"judge": judge.model_dump(mode="json"), "split": split, "seed": SAMPLE_SEED}
    stamps = [card.get("created", "") for card in probe_cards(judge)]  # retrained: another judge
    what |= {"rows": MAX_ROWS, "cards": stamps, "version": 1}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def calibrate(run: RunDir, *, stage: str, out: str, config: Config) -> dict[str, Any]:
    """Run (or skip, if done) the calibration of both judges into ``out`` (run-relative)."""

    def cached(judge: JudgeSection, split: str) -> dict[str, Any]:
        """The judge's figures from the cache, scored and stored there when missing."""
        path = cache_root() / "calibration" / f"{cache_key(judge, split)}.json"
        if path.exists():
            return {**read_json(path), "from_cache": True}
        figures = score(judge, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, figures)
        return {**figures, "from_cache": False}

    def score(judge: JudgeSection, split: str) -> dict[str, Any]:
        rows = held_back_rows(split)
        ds = judge_dataset(ray.data.from_items(rows), judge, config.policy.dtype)
        judged = [
            row
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None)
            for row in batch.to_pylist()
        ]
        return {
            "held_back_split": split,
            "evaluators": [e.model_dump() for e in judge.evaluators],
            "human_labels": human_labels(judge),
            **accuracy(judged, judge.unsafe_threshold),
        }

    def work() -> dict[str, Any]:
        # Both judges at once: each judge actor computes on one thread (judge.num_cpus_per_actor
        # 0.5 in the demo), so one after the other would leave half of a 2-core machine idle
        # (82 s against about 45 s for the demo's two judges).
        with ThreadPoolExecutor(max_workers=2) as pool:
            training = pool.submit(cached, config.judge, "audit")
            audit = pool.submit(cached, config.evaluate.judge, "train")
            summary = {"training_judge": training.result(), "audit_judge": audit.result()}
        write_json(run.path(out), summary)
        # the manifest keeps the headline figures (the file has them all)
        return {
            f"{name}_safety_accuracy": figures["safety"]["accuracy"]
            for name, figures in summary.items()
        } | {"from_cache": all(figures["from_cache"] for figures in summary.values())}

    return run.run_stage(stage, [out], work)
