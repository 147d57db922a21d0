"""The engine contract: chat prompts in, sampled responses out, the same for every backend.

Rows in: ``id`` (prompt id) and ``text`` (a user turn) or ``messages`` (a chat, as a list of
``{"role", "content"}``), or ``prompt``: raw text the model continues as is, with no chat template
and no special tokens added (completion mode, e.g. the red team's list continuation; the local
engines only, an endpoint speaks chat). Rows out: every input column, plus one row per sample with
``sample_index``, ``response``, ``prompt_tokens``, ``response_tokens`` and ``finish_reason``
(``"stop"`` or ``"length"``). Backends are callable classes for ``Dataset.map_batches``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

PROMPT = "prompt"  # the column of a raw (completion-mode) prompt
OUTPUT_COLUMNS = ("sample_index", "response", "prompt_tokens", "response_tokens", "finish_reason")
# Below this a temperature cannot be sampled (logits / T overflow to inf): it means greedy.
MIN_SAMPLING_TEMPERATURE = 1e-3


def is_greedy(temperature: float) -> bool:
    """Whether ``temperature`` decodes greedily: 0, or too small to sample from."""
    return temperature < MIN_SAMPLING_TEMPERATURE


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.0  # 0 (or below MIN_SAMPLING_TEMPERATURE) means greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)


class MalformedRowError(ValueError):
    """A prompt row that the engine contract cannot turn into a chat."""


def _missing(value: Any) -> bool:
    """None, or the NaN that pandas writes for a missing value."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _id_of(row: dict[str, Any]) -> str:
    value = row.get("id")
    return repr(value.item() if isinstance(value, np.generic) else value)


def chat_of(row: dict[str, Any]) -> list[dict[str, str]]:
    """The chat for a row: its ``messages`` if present, else one user turn of ``text``.

    Raises :class:`MalformedRowError` (a ``ValueError``) naming the row when it has neither, or
    when a message lacks ``role``/``content``: a silent ``"None"`` prompt would waste a whole
    generation pass and poison the judged data.
    """
    messages = row.get("messages")
    if not _missing(messages) and len(messages) > 0:
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise MalformedRowError(
                    f"prompt row id={_id_of(row)}: messages[{i}] must be a mapping with "
                    f"'role' and 'content', got {m!r}"
                )
            chat.append({"role": str(m["role"]), "content": str(m["content"])})
        return chat
    text = row.get("text")
    if _missing(text):
        raise MalformedRowError(
            f"prompt row id={_id_of(row)} has neither 'text' nor non-empty 'messages' "
            f"(columns: {sorted(row)}); every row needs one of them (engines/base.py)"
        )
    return [{"role": "user", "content": str(text)}]


def raw_prompt(row: dict[str, Any]) -> str | None:
    """A row's raw ``prompt`` (completion mode), or None for a chat row."""
    raw = row.get(PROMPT)
    return None if _missing(raw) else str(raw)


def prompt_text(row: dict[str, Any], tokenizer: Any) -> str:
    """The text a row's model input starts from: its raw ``prompt`` as is (completion mode), else
    its chat in the tokenizer's chat template with the assistant's turn opened. A chat whose last
    turn is the assistant's is continued from inside that turn (a prefilled answer opening)."""
    raw = raw_prompt(row)
    if raw is not None:
        return raw
    chat = chat_of(row)
    if chat[-1]["role"] == "assistant":
        return tokenizer.apply_chat_template(chat, continue_final_message=True, tokenize=False)
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def rows_of(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A ``{column: array}`` batch as a list of row dicts."""
    return [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def explode(
    columns: list[str], rows: list[dict[str, Any]], outputs: list[list[dict[str, Any]]]
) -> dict[str, np.ndarray]:
    """One output row per sample: the input ``columns`` repeated, plus ``OUTPUT_COLUMNS``."""
    out: dict[str, list[Any]] = {key: [] for key in [*columns, *OUTPUT_COLUMNS]}
    for row, samples in zip(rows, outputs, strict=True):
        for sample in samples:
            for key in columns:
                out[key].append(row[key])
            for key in OUTPUT_COLUMNS:
                out[key].append(sample[key])
    return {key: _object_array(values) for key, values in out.items()}


def _object_array(values: list[Any]) -> np.ndarray:
    """A 1-D object array, even when the values are same-length lists (e.g. ``messages``)."""
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        array[i] = value
    return array


def join_prefill(prefill: str, continuation: str) -> str:
    """The whole answer: the engines strip what they return, so the space the model wrote between
    the prefill and its next word ("I can't" + " help") is put back."""
    space = continuation[:1].isalnum() and not prefill[-1:].isspace()
    return prefill + (" " if space else "") + continuation
