"""Recipe: train the configured policy on a file of preference pairs (or PT-ALIGN triples).

The training half of one Self-MOA iteration, on data you bring: ``selfmoa train --pairs FILE``.
It reads top to bottom: import the file into the run folder, compute reference log-probabilities
(the preference losses need them; PT-ALIGN does not), train on Ray Train, and leave the next
policy in ``<run>/policy`` as a Hugging Face folder. Each step is a stage of the run folder, so a
killed run started again with ``--resume`` continues where it stopped.

Accepted files: Parquet or JSONL in TRL's preference format (``prompt``, ``chosen``,
``rejected``; chat messages or strings) plus the score columns the loss needs; see
:mod:`selfmoa_ray.training.data`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from selfmoa_ray.config import Config
from selfmoa_ray.recipes.steps import stage_done
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.stages.reference import REFERENCE_COLUMNS, reference
from selfmoa_ray.stages.train import train
from selfmoa_ray.training.data import MalformedPairError
from selfmoa_ray.training.objective import check_columns, needs_reference

DATA = "data/pairs.parquet"
WITH_REFERENCE = "data/pairs_ref.parquet"
POLICY = "policy"


def read_pairs_file(path: Path) -> pa.Table:
    """A user's pairs file as an Arrow table, with a clear error for what we cannot read."""
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    try:
        if path.suffix == ".parquet":
            return pq.read_table(path)
        if path.suffix in (".jsonl", ".json"):
            return pajson.read_json(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise MalformedPairError(f"{path}: cannot read as {path.suffix[1:]}: {err}") from err
    raise MalformedPairError(f"{path}: use .parquet or .jsonl (got {path.suffix or 'no suffix'})")


def validate_pairs_file(config: Config, pairs_file: Path) -> int:
    """Fail fast, before Ray starts, on a file the configured loss cannot train on."""
    table = read_pairs_file(pairs_file)
    data_columns = [c for c in table.column_names if not c.startswith("ref_")]
    check_columns(config.train, data_columns + list(REFERENCE_COLUMNS))
    return table.num_rows


def train_on_file(config: Config, pairs_file: Path, run: RunDir) -> dict[str, Any]:
    """Import, reference pass (if the loss needs one), train. Returns the train stage's entry."""
    if not run.is_done("import"):
        validate_pairs_file(config, pairs_file)

    def work() -> dict[str, Any]:
        return {"rows": _import(pairs_file, run.path(DATA)), "source": str(pairs_file)}

    stage_done(run, run.run_stage("import", [DATA], work), "import")
    data, model, section = DATA, config.policy, config.train
    if needs_reference(section):
        files = {"stage": "reference", "pairs": DATA, "out": WITH_REFERENCE}
        entry = reference(run, **files, model=model, engine=config.engine, train=section)
        stage_done(run, entry, "reference")
        data = WITH_REFERENCE
    files = {"stage": "train", "data": data, "out": POLICY}
    return train(run, **files, model=model, config=section, seed=config.run.seed)


def _import(source: Path, target: Path) -> int:
    table = read_pairs_file(source)
    write_parquet(target, table)
    return table.num_rows
