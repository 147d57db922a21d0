"""User prompt files (JSONL, CSV, Parquet): validated row by row; errors name file, line, reason.

A row's prompt is ``text`` (alias ``prompt``), or ``messages``: a chat in the OpenAI format (a list
of ``{"role", "content"}`` turns, as in Hugging Face chat datasets and OpenAI fine-tuning files).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from selfmoa_ray.sources.packages import snake
from selfmoa_ray.sources.schema import PromptRow

MESSAGES = "messages"  # the column of a chat prompt
CHAT_ROLES = ("system", "user", "assistant")


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
    if MESSAGES in header:
        raise PromptFileError(
            path,
            1,
            f"column '{MESSAGES}' needs a list of chat turns, which CSV cannot hold; "
            "write chats as JSONL or Parquet, or give the prompt as a 'text' column",
        )
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
    if not {"text", "prompt", MESSAGES} & set(table.column_names):
        raise PromptFileError(
            path,
            None,
            f"missing column 'text' (or 'prompt', or '{MESSAGES}'); "
            f"columns are {table.column_names}",
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


Fail = Callable[[str], ValueError]  # reason -> an error naming the file (or dataset) and row


def _field(record: dict, name: str, default: str, fail: Fail) -> str:
    value = record.get(name)
    if value is None:
        return default
    if name == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise fail(f"field '{name}' must be a string, got {type(value).__name__}")
    return value.strip() or default


def chat_prompt(messages: Any, fail: Fail, key: str = MESSAGES) -> str:
    """The prompt of an OpenAI-format chat: its one user turn; a trailing assistant turn (the
    answer, not part of the prompt) is dropped.

    A prompt row carries one user turn of text, and every stage reads that text (red team, dedup,
    judges, reports), so a system turn or earlier turns could not reach the chat template: such
    chats are refused rather than silently cut.
    """
    if not isinstance(messages, list):
        raise fail(
            f"field '{key}' must be a list of {{role, content}} turns, "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise fail(f"empty '{key}'")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise fail(f"{key}[{i}] must be an object with 'role' and 'content', got {turn!r}")
        role, content = turn.get("role"), turn.get("content")
        if role is None:
            raise fail(f"{key}[{i}] has no 'role'")
        if role not in CHAT_ROLES:
            raise fail(
                f"{key}[{i}]: unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(content, str):
            raise fail(
                f"{key}[{i}] ({role}): 'content' must be a string, got {type(content).__name__}"
            )
    turns = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    if not turns or turns[-1]["role"] != "user":
        roles = " -> ".join(t["role"] for t in messages)
        raise fail(
            f"the last turn of '{key}' must be the user's (optionally followed by one assistant "
            f"answer, which is dropped); got {roles}"
        )
    if len(turns) > 1:
        roles = " -> ".join(t["role"] for t in turns)
        raise fail(
            f"'{key}' has {roles} before the answer: only single-turn chats are supported (one "
            "user turn, optionally followed by the assistant's answer, which is dropped); "
            "prompts are a single user turn, so fold a system turn or earlier turns into it"
        )
    text = turns[0]["content"].strip()
    if not text:
        raise fail(f"{key}[{len(turns) - 1}] (user): empty 'content'")
    return text


def plain_prompt(value: Any, key: str, fail: Fail) -> str:
    """A text prompt, stripped; missing, non-string and blank values are errors."""
    if value is None:
        raise fail(f"missing field '{key}'")
    if not isinstance(value, str):
        raise fail(f"field '{key}' must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise fail(f"empty '{key}'")
    return text


def _record_prompt(record: dict, fail: Fail) -> str:
    """``text`` (alias ``prompt``) or ``messages``; a row with both kinds is ambiguous."""
    if record.get(MESSAGES) is not None:
        for key in ("text", "prompt"):
            if record.get(key) is not None:
                raise fail(f"both '{key}' and '{MESSAGES}'; give the prompt one way only")
        return chat_prompt(record[MESSAGES], fail)
    if record.get("text") is None and record.get("prompt") is None:
        raise fail(f"missing field 'text' (or 'prompt', or '{MESSAGES}')")
    key = "prompt" if record.get("text") is None else "text"
    return plain_prompt(record[key], key, fail)


def make_row(text: str, record: dict, fail: Fail, defaults: dict[str, str]) -> PromptRow:
    """A row for ``text`` with the record's optional ``id``, ``category``, ``split`` and ``source``
    (``defaults`` otherwise; the default id hashes the text, so ids survive reordering)."""
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    return PromptRow(
        id=_field(record, "id", f"{defaults['prefix']}-{digest}", fail),
        text=text,
        category=snake(_field(record, "category", defaults["category"], fail))
        or defaults["category"],
        source=_field(record, "source", defaults["source"], fail),
        split=_field(record, "split", defaults["split"], fail),
    )


def _row_from_record(record: Any, fail: Fail, defaults: dict[str, str]) -> PromptRow:
    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    return make_row(_record_prompt(record, fail), record, fail, defaults)


def unique_rows(
    numbered: Iterable[tuple[int, PromptRow]], fail_at: Callable[[int, str], ValueError], unit: str
) -> list[PromptRow]:
    """The rows in order; a repeated id is an error at its second line (or row)."""
    rows: list[PromptRow] = []
    first_line: dict[str, int] = {}
    for lineno, row in numbered:
        if row.id in first_line:
            raise fail_at(
                lineno, f"duplicate id {row.id!r} (first used on {unit} {first_line[row.id]})"
            )
        first_line[row.id] = lineno
        rows.append(row)
    return rows


def load_prompt_file(
    path: str | Path, *, default_split: str = "user", default_category: str = "user"
) -> list[PromptRow]:
    """Prompts from a ``.jsonl``, ``.csv`` or ``.parquet`` file, validated row by row.

    Required: ``text`` (alias ``prompt``), or ``messages`` (JSONL and Parquet: a single-turn
    OpenAI-format chat, see :func:`chat_prompt`). Optional: ``id`` (default: file stem + a hash of
    the text, so ids survive reordering), ``category``, ``split``, ``source`` (default: file name).
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

    def fail_at(lineno: int, reason: str) -> PromptFileError:
        return PromptFileError(path, lineno, reason, unit)

    numbered = (
        (lineno, _row_from_record(record, functools.partial(fail_at, lineno), defaults))
        for lineno, record in reader(path)
    )
    rows = unique_rows(numbered, fail_at, unit)
    if not rows:
        raise PromptFileError(path, None, "empty file (no prompts)")
    return rows
