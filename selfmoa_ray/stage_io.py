"""Reading and writing stage files: Parquet tables as rows, and Ray datasets in and out.

Every stage reads its inputs and writes its outputs through these, so that a missing column is
the same clear error everywhere and a dataset output is published only when complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from selfmoa_ray.console import row_progress
from selfmoa_ray.engines.pool import as_dataset
from selfmoa_ray.rundir import RunDir, atomic_path


def read_rows(
    path: str | os.PathLike[str], required: Iterable[str], optional: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """The ``required`` columns of a Parquet file or folder (and those ``optional`` ones it has),
    as rows; a missing required column is an error that names the file. Other columns (the
    per-evaluator scores, say) are not read."""
    required = list(required)
    names = pq.ParquetDataset(path).schema.names
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {names}")
    columns = required + [c for c in optional if c in names and c not in required]
    return pq.read_table(path, columns=columns).to_pylist()


def group_by_prompt(rows: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by ``id``: ids in sorted order, each group in ``sample_index`` order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["id"], []).append(row)
    return [sorted(groups[key], key=lambda r: r.get("sample_index", 0)) for key in sorted(groups)]


def read_dataset(run: RunDir, path: str, *, rows_per_block: int | None = None) -> ray.data.Dataset:
    """A stage's input (a Parquet file or folder in the run) as a dataset, read on the driver.

    Stage inputs are small (prompts, answers, pairs: kilobytes to a few megabytes), and Ray
    Data's ``read_parquet`` costs 4-13 s per call on 2 cores (file listing and read tasks), more
    than some stages' whole work; an in-memory table costs a tenth of a second. Blocks of
    ``rows_per_block`` rows keep every actor of a pool busy (a pool hands out whole blocks).
    """
    return as_dataset(pq.read_table(run.path(path)), rows_per_block)


def write_dataset(
    ds: ray.data.Dataset,
    run: RunDir,
    out: str,
    *,
    total: int | None = None,
    label: str | None = None,
    tokens: bool = False,
) -> None:
    """Write a dataset as a Parquet folder (one part file per block), published only once complete.

    The blocks stream through the driver as they are produced, so the console's progress bar
    (``label``, default ``out``; ``total`` rows expected, for its ETA; ``tokens``: generated
    tokens/s from ``response_tokens``) shows the running stage. Part files whose schemas differ
    (a block whose column is all null) are rewritten to the unified schema, so any reader of the
    folder sees one schema.
    """
    with atomic_path(run.path(out)) as tmp, row_progress(label or out, total, tokens=tokens) as bar:
        tmp.mkdir()
        parts: list[tuple[Path, pa.Schema]] = []
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if block.num_rows or not parts:  # one empty part keeps the schema of an empty result
                part = tmp / f"part-{len(parts):05d}.parquet"
                pq.write_table(block, part)
                parts.append((part, block.schema))
            bar(block)
        if not parts:  # no block at all: an empty table of the dataset's schema
            schema = ds.schema()
            empty = pa.schema(schema.base_schema) if schema is not None else pa.schema([])
            pq.write_table(empty.empty_table(), tmp / "part-00000.parquet")
        _unify_parts(parts)


def _unify_parts(parts: list[tuple[Path, pa.Schema]]) -> None:
    schemas = [schema for _, schema in parts]
    if all(schema.equals(schemas[0]) for schema in schemas[1:]):
        return
    unified = pa.unify_schemas(schemas, promote_options="permissive")
    for part, schema in parts:
        if not schema.equals(unified):
            table = pq.read_table(part)
            pq.write_table(table.select(unified.names).cast(unified), part)
