"""User prompt files (JSONL, CSV, Parquet): validated row by row; errors name file, line, reason."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from selfmoa_ray.sources.packages import snake
from selfmoa_ray.sources.schema import PromptRow


class PromptFileError(ValueError):
    """A malformed prompt file; says which file, which line (or row) and why."""

    def __init__(self, path: str | Path, line: int | None, reason: str, unit: str = "line"):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}, {unit} {line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(path, lineno, f"invalid JSON ({exc.msg})") from exc
        yield lineno, record


def _iter_csv(path: Path) -> Iterator[tuple[int, Any]]:
    """Records with the physical line each starts on (header = line 1)."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise PromptFileError(path, 1, f"invalid CSV ({exc})") from exc
    header = [h.strip() for h in header]
    if "text" not in header and "prompt" not in header:
        raise PromptFileError(path, 1, f"missing column 'text' (or 'prompt'); header is {header}")
    end = reader.line_num
    while True:
        start = end + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise PromptFileError(path, start, f"invalid CSV ({exc})") from exc
        end = reader.line_num
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise PromptFileError(
                path, start, f"expected {len(header)} fields, found {len(values)}"
            )
        yield start, dict(zip(header, values, strict=True))


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise PromptFileError(path, None, f"unreadable parquet ({exc})") from exc
    if "text" not in table.column_names and "prompt" not in table.column_names:
        raise PromptFileError(
            path, None, f"missing column 'text' (or 'prompt'); columns are {table.column_names}"
        )
    yield from enumerate(table.to_pylist(), start=1)


_READERS: dict[str, Callable[[Path], Iterator[tuple[int, Any]]]] = {
    ".jsonl": _iter_jsonl,
    ".csv": _iter_csv,
    ".parquet": _iter_parquet,
}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(
            path, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc


def _field(record: dict, name: str, default: str, fail: Callable[[str], PromptFileError]) -> str:
    value = record.get(name)
    if value is None:
        return default
    if name == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise fail(f"field '{name}' must be a string, got {type(value).__name__}")
    return value.strip() or default


def _row_from_record(
    record: Any, fail: Callable[[str], PromptFileError], defaults: dict[str, str]
) -> PromptRow:
    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    key = "prompt" if record.get("text") is None and "prompt" in record else "text"
    text = record.get(key)
    if text is None:
        raise fail("missing field 'text' (or 'prompt')")
    if not isinstance(text, str):
        raise fail(f"field '{key}' must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise fail(f"empty '{key}'")
    source = _field(record, "source", defaults["source"], fail)
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    return PromptRow(
        id=_field(record, "id", f"{defaults['prefix']}-{digest}", fail),
        text=text,
        category=snake(_field(record, "category", defaults["category"], fail))
        or defaults["category"],
        source=source,
        split=_field(record, "split", defaults["split"], fail),
    )


def load_prompt_file(
    path: str | Path, *, default_split: str = "user", default_category: str = "user"
) -> list[PromptRow]:
    """Prompts from a ``.jsonl``, ``.csv`` or ``.parquet`` file, validated row by row.

    Required: ``text`` (alias ``prompt``). Optional: ``id`` (default: file stem + a hash of the
    text, so ids survive reordering), ``category``, ``split``, ``source`` (default: file name).
    Any problem raises :class:`PromptFileError` naming the file, the line (CSV: physical line
    incl. header; parquet: 1-based row) and the reason.
    """
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise PromptFileError(
            path, None, f"unknown extension {path.suffix!r}; use one of {sorted(_READERS)}"
        )
    if not path.is_file():
        raise PromptFileError(path, None, "no such file")
    unit = "row" if reader is _iter_parquet else "line"
    defaults = {
        "split": default_split,
        "category": snake(default_category) or "user",
        "source": path.name,
        "prefix": snake(path.stem) or "user",
    }
    rows: list[PromptRow] = []
    first_line: dict[str, int] = {}
    for lineno, record in reader(path):

        def fail(reason: str, lineno: int = lineno) -> PromptFileError:
            return PromptFileError(path, lineno, reason, unit)

        row = _row_from_record(record, fail, defaults)
        if row.id in first_line:
            raise fail(f"duplicate id {row.id!r} (first used on {unit} {first_line[row.id]})")
        first_line[row.id] = lineno
        rows.append(row)
    if not rows:
        raise PromptFileError(path, None, "empty file (no prompts)")
    return rows
