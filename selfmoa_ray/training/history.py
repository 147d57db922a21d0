"""Per-step training metrics in the run folder, for the experiment tracker (report/tracking.py).

Ray Train hears from the workers only every ``train.report_every`` optimizer steps (each
``ray.train.report`` waits for the controller's poll), and the stage deletes Ray Train's folder
once the policy is published, so the driver has no per-step curve of its own. Instead rank 0
appends one JSON line per optimizer step to ``<stage>_history.jsonl`` in the run folder
(``iter_01/train_history.jsonl`` for the stage ``iter_01/train``): the step, the fractional
epoch and the metrics the loop already has as floats (rank 0's batch; the last micro-batch's under
gradient accumulation). Each line is flushed, costing no device sync beyond the loop's own
``float(loss)``. A worker resumed from a checkpoint first drops the lines past the checkpoint's
step, so every step appears once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from selfmoa_ray.rundir import atomic_write

HISTORY_SUFFIX = "_history.jsonl"


def history_path(stage: str) -> str:
    """The run-relative history file of the train stage ``stage``: one per stage, so two
    trainings in one folder (``selfmoa train`` runs) keep theirs apart."""
    return f"{stage}{HISTORY_SUFFIX}"


def read_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a history file (none if it is missing); a last line cut short by a kill is
    skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class StepHistory:
    """Rank 0's writer of the history file; does nothing when ``path`` is None (other ranks, or
    a caller that asked for no history). ``resumed_step``: the optimizer step of the checkpoint
    the worker resumed from (0 on a fresh start), after which earlier lines are dropped."""

    def __init__(self, path: str | os.PathLike[str] | None, resumed_step: int = 0):
        self._fh: IO[str] | None = None
        if path is None:
            return
        path = Path(path)
        kept = [row for row in read_history(path) if row["step"] <= resumed_step]
        with atomic_write(path) as fh:
            fh.writelines(json.dumps(row) + "\n" for row in kept)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, step: int, epoch: float, metrics: dict[str, Any]) -> None:
        """One optimizer step's line: ``{"step", "epoch", **metrics}`` (floats only)."""
        if self._fh is None:
            return
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._fh.write(json.dumps({"step": int(step), "epoch": round(epoch, 4), **numbers}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
