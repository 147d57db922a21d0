"""Human-labelled (prompt, response) rows from PyRIT's ``datasets/scorer_evals/`` (MIT).

They train and validate the CPU proxy judge (weak supervision, docs/design.md section 4). Note: 12
HarmBench behaviours appear among their objectives, so a judge trained on them has seen those
held-out prompts (not their responses); the evaluation report says so.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfmoa_ray.sources.packages import data_path, snake

SCORER_TASKS = ("objective", "refusal", "harm")


@dataclass(frozen=True)
class ScorerRow:
    """One human-labelled (prompt, response) pair.

    ``label`` is a float in [0, 1]:

    - ``objective``: 1 = the response achieves the (harmful) objective, 0 = it does not;
    - ``refusal``: 1 = the response is a refusal, 0 = it is not;
    - ``harm``: a 1-5 Likert harm rating already normalised by PyRIT to 0, .25, .5, .75, 1;
      where several raters (``human_score_1..3``) or duplicate rows rated the same pair, the
      label is their mean and ``label_name`` lists the raw scores joined by ``|``.

    Binary tasks' labels are 0/1 (a duplicate pair with conflicting labels would average).
    Prompt and response text are kept byte-for-byte (not stripped).
    """

    id: str
    task: str
    prompt: str
    response: str
    label: float
    label_name: str
    source: str
    category: str = ""


# task -> folder under scorer_evals. Files that are strict subsets of others are skipped so the
# same annotation is not counted twice; ``sample/mini_refusal.csv`` (24 rows, all in the two
# refusal files) lies outside these folders.
_SCORER_FOLDERS = {"objective": "objective", "refusal": "refusal_scorer", "harm": "harm"}
_SCORER_SUBSETS = {"harm/mini_hate_speech.csv"}  # == 15 rows of hate_speech_multi_score.csv


def _read_scorer_csv(path: Path) -> list[dict[str, str]]:
    """CSV rows after the leading ``# dataset_version=...`` lines.

    Only *leading* comment lines are dropped: responses contain markdown lines starting with
    ``#`` inside quoted fields, which a line filter (or pandas ``comment='#'``) would cut.
    """
    text = path.read_text(encoding="utf-8-sig")
    lines = text.splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        start += 1
    return list(csv.DictReader(io.StringIO("".join(lines[start:]), newline="")))


def _scores(row: dict[str, str]) -> list[str]:
    keys = sorted(k for k in row if k and k.startswith("human_score"))
    return [row[k].strip() for k in keys if row[k] is not None and row[k].strip() != ""]


def _scorer_rows_for(task: str, root: Path) -> list[ScorerRow]:
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((root / _SCORER_FOLDERS[task]).glob("*.csv")):
        rel = path.relative_to(root).as_posix()
        if rel in _SCORER_SUBSETS:
            continue
        for i, row in enumerate(_read_scorer_csv(path), start=1):
            key = (row["objective"], row["assistant_response"])
            entry = merged.setdefault(
                key,
                {
                    "id": f"{task}-{path.stem}-{i:04d}",
                    "scores": [],
                    "source": f"pyrit:scorer_evals/{rel}",
                    "category": snake(row.get("harm_category") or task),
                },
            )
            entry["scores"].extend(_scores(row))
    rows = []
    for (prompt, response), entry in merged.items():
        values = [float(s) for s in entry["scores"]]
        label = sum(values) / len(values)
        if not 0.0 <= label <= 1.0:
            raise ValueError(f"{entry['id']}: label {label} outside [0, 1]")
        rows.append(
            ScorerRow(
                entry["id"],
                task,
                prompt,
                response,
                label,
                "|".join(entry["scores"]),
                entry["source"],
                entry["category"],
            )
        )
    return rows


@functools.cache
def _cached_scorer_rows(task: str) -> tuple[ScorerRow, ...]:
    root = data_path("pyrit", "datasets", "scorer_evals")
    return tuple(_scorer_rows_for(task, root))


def load_scorer_rows(task: str | None = None) -> list[ScorerRow]:
    """Human-labelled rows of one task (``objective``, ``refusal``, ``harm``), or all tasks.

    Identical (prompt, response) pairs within a task are merged (mean label); the same pair
    may appear under two tasks with different meanings (e.g. harm and objective).
    """
    if task is not None and task not in SCORER_TASKS:
        raise ValueError(f"unknown scorer task {task!r}; allowed: {', '.join(SCORER_TASKS)}")
    tasks = SCORER_TASKS if task is None else (task,)
    return [row for t in tasks for row in _cached_scorer_rows(t)]
