"""The engine contract: chat prompts in, sampled responses out, the same for every backend.

Rows in: ``id`` (prompt id) and ``text`` (a user turn) or ``messages`` (a chat, as a list of
``{"role", "content"}``). Rows out: every input column, plus one row per sample with
``sample_index``, ``response``, ``prompt_tokens``, ``response_tokens`` and ``finish_reason``
(``"stop"`` or ``"length"``). Backends are callable classes for ``Dataset.map_batches``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OUTPUT_COLUMNS = ("sample_index", "response", "prompt_tokens", "response_tokens", "finish_reason")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def chat_of(row: dict[str, Any]) -> list[dict[str, str]]:
    """The chat for a row: its ``messages`` if present, else one user turn of ``text``."""
    messages = row.get("messages")
    if messages is not None and len(messages) > 0:
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    return [{"role": "user", "content": str(row["text"])}]
