"""The one row schema every prompt source produces: id, text, category, source, split."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import pyarrow as pa

PROMPT_COLUMNS = ("id", "text", "category", "source", "split")


@dataclass(frozen=True)
class PromptRow:
    """One prompt, whatever its origin; ``split`` says what it may be used for."""

    id: str
    text: str
    category: str
    source: str
    split: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


_PROMPT_SCHEMA = pa.schema([(name, pa.string()) for name in PROMPT_COLUMNS])


def rows_to_table(rows: Iterable[PromptRow]) -> pa.Table:
    """Columnar form for Ray Data and parquet; column order is ``PROMPT_COLUMNS``."""
    rows = list(rows)
    columns = {name: [getattr(r, name) for r in rows] for name in PROMPT_COLUMNS}
    return pa.table(columns, schema=_PROMPT_SCHEMA)


def table_to_rows(table: pa.Table) -> list[PromptRow]:
    """Inverse of :func:`rows_to_table`; extra columns are ignored, missing ones are an error."""
    missing = [name for name in PROMPT_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"prompt table lacks column(s) {missing}; expected {list(PROMPT_COLUMNS)}")
    columns = [table.column(name).to_pylist() for name in PROMPT_COLUMNS]
    rows = []
    for i, values in enumerate(zip(*columns, strict=True)):
        if any(not isinstance(v, str) for v in values):
            raise ValueError(f"prompt table row {i}: every column must be a non-null string")
        rows.append(PromptRow(*values))
    return rows
