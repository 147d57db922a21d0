"""Where every stage's files live in a run folder: the data flow of the recipes in one table.

A run folder holds the start policy's evaluation (``baseline/``), the judges' calibration, the
validation prompts, and one folder per iteration (``iter_01/``, ...) with a file per stage output.
Stages never spell these paths: the recipe hands each stage its files, read off this module
(``Iteration.io``), so that renaming a file or rewiring a stage touches one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BASELINE = "baseline"  # the start policy's held-out evaluation (a folder, like an iteration's)
CALIBRATION = "calibration.json"  # the judges on held-back human labels (stages/calibrate.py)
VALIDATION = (
    "validation.parquet"  # prompts each training chooses its epoch on (stages/validation.py)
)

PROMPTS = "prompts.parquet"
FAILURES = "failures.parquet"
POLICY = "policy"

# Per stage kind, the stage's file arguments and their names inside the iteration's folder.
STAGE_FILES: dict[str, dict[str, str]] = {
    # Self-MOA (recipes/selfmoa.py), in loop order
    "redteam": {"out": PROMPTS},
    "sample": {"prompts": PROMPTS, "out": "responses.parquet"},
    "judge": {"responses": "responses.parquet", "out": "scored.parquet"},
    "failures": {"scored": "scored.parquet", "out": FAILURES},
    "pairs": {"scored": "scored.parquet", "out": "pairs.parquet"},
    "spans": {"pairs": "pairs.parquet", "out": "pairs_marked.parquet"},  # combined recipe
    "reference": {"pairs": "pairs.parquet", "out": "pairs_ref.parquet"},
    "train": {"data": "pairs_ref.parquet", "out": POLICY},
    "vault": {"answers": "vault_answers.parquet", "out": "vault.parquet"},
    # PT-ALIGN (recipes/pt_align.py): its one iteration's data stages
    "topics": {"out": "topics.parquet"},
    "instructions": {"topics": "topics.parquet", "out": "instructions.parquet"},
    "positive": {"instructions": "instructions.parquet", "out": "positives.parquet"},
    "toxic": {"instructions": "instructions.parquet", "out": "toxics.parquet"},
    "filter": {
        "positives": "positives.parquet",
        "toxics": "toxics.parquet",
        "out": "filtered.parquet",
    },  # fmt: skip
    "triples": {"filtered": "filtered.parquet", "out": "triples.parquet"},
}


@dataclass(frozen=True)
class Iteration:
    """Iteration ``t`` of a loop (t >= 1): its folder, its stages' names and files."""

    t: int

    @property
    def name(self) -> str:
        return f"iter_{self.t:02d}"

    def file(self, name: str) -> str:
        """A file of this iteration, relative to the run folder."""
        return f"{self.name}/{name}"

    def stage(self, kind: str) -> str:
        """The stage's name in the run manifest, e.g. ``iter_01/judge``."""
        return f"{self.name}/{kind}"

    def earlier(self) -> list[Iteration]:
        return [Iteration(t) for t in range(1, self.t)]

    def io(self, kind: str) -> dict[str, Any]:
        """The keyword arguments that name the stage and its files, e.g. for ``pairs``:
        ``{"stage": "iter_01/pairs", "scored": "iter_01/scored.parquet", "out": ...}``."""
        files: dict[str, Any] = {"stage": self.stage(kind)}
        files.update({arg: self.file(name) for arg, name in STAGE_FILES[kind].items()})
        if kind == "redteam":  # every earlier round's attacks and successes, the validation set
            files["earlier"] = [(e.t, e.file(PROMPTS), e.file(FAILURES)) for e in self.earlier()]
            files["validation"] = VALIDATION
        return files
