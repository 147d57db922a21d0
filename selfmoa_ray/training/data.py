"""Rows of pairs and triples -> token ids and masks, shared by the reference pass and the trainer.

Both must tokenise a response identically, or the reference log-probabilities stored beside the
pairs would not match the policy's; hence one function, :func:`encode_response`, used by both.

Row schemas (Parquet columns; TRL's preference format plus our score columns):

* pairs: ``prompt`` (chat messages, or a string taken as one user turn), ``chosen`` and
  ``rejected`` (the assistant's text, or a one-message assistant list), optional
  ``safety_delta`` (MODPO margin, s(chosen) - s(rejected)), ``chosen_safety``,
  ``chosen_helpfulness``, ``rejected_safety``, ``rejected_helpfulness`` (scalarised DPO) and,
  after the reference pass, ``ref_chosen_logps`` / ``ref_rejected_logps``; optional
  ``harmful_spans`` into ``rejected`` (the combined recipe: unlikelihood on those tokens);
* triples (PT-ALIGN): ``prompt``, ``positive``, ``toxic`` and ``harmful_spans``, a list of
  ``[start, end)`` character offsets into ``toxic`` that mark its harmful text.

A response is encoded as the prompt's chat template (with the generation prompt), then the
response tokens, then the template's end-of-turn token, so the model also learns where to stop.
Only response and end-of-turn positions are trained on; harmful marks land only on response
tokens, never on template or special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

SENTINEL = "\u2063SELFMOA\u2063"  # text no chat template contains, to find the end-of-turn


class MalformedPairError(ValueError):
    """A pair or triple row that cannot be encoded (missing column, wrong type, empty text)."""


@dataclass(frozen=True)
class Encoded:
    """One prompt + response: ids, which positions are response, which are marked harmful."""

    input_ids: list[int]
    response_mask: list[bool]
    harmful_mask: list[bool]


def messages_of(prompt: Any) -> list[dict[str, str]]:
    """The prompt column as chat messages: a list of ``{role, content}`` or a bare string."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise MalformedPairError("prompt is empty")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, np.ndarray):
        prompt = prompt.tolist()
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        for m in prompt:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise MalformedPairError(f"prompt message {m!r} needs string role and content")
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise MalformedPairError(f"prompt must be a string or chat messages, got {type(prompt)}")


def text_of(response: Any, column: str) -> str:
    """A response column as text: a string, or TRL's one-message assistant list."""
    if isinstance(response, np.ndarray):
        response = response.tolist()
    if isinstance(response, list) and len(response) == 1 and isinstance(response[0], dict):
        response = response[0].get("content")
    if not isinstance(response, str) or not response.strip():
        raise MalformedPairError(f"{column} must be a non-empty string, got {response!r}")
    return response


@cache
def _end_of_turn(tokenizer: Any) -> tuple[int, ...]:
    """The special token the chat template puts right after an assistant message (else EOS)."""
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    suffix = rendered.split(SENTINEL, 1)[1] if SENTINEL in rendered else ""
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    if ids and ids[0] in set(tokenizer.all_special_ids):
        return (ids[0],)
    return (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()


def encode_response(
    tokenizer: Any,
    prompt: Any,
    response: str,
    *,
    max_length: int,
    harmful_spans: Sequence[Sequence[int]] = (),
) -> Encoded:
    """Template + response + end-of-turn, truncated to ``max_length`` tokens.

    A prompt longer than half of ``max_length`` keeps its last tokens; the response is then cut
    to fit (and loses its end-of-turn token, since it did not end there).
    """
    prompt_ids = list(
        tokenizer.apply_chat_template(
            messages_of(prompt), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    special = set(tokenizer.all_special_ids)
    harmful = [
        bool(b > a and t not in special and any(a < e and b > s for s, e in harmful_spans))
        for t, (a, b) in zip(ids, offsets, strict=True)
    ]
    end = list(_end_of_turn(tokenizer))
    if len(prompt_ids) > max_length // 2 and len(prompt_ids) + len(ids) + len(end) > max_length:
        prompt_ids = prompt_ids[-(max_length // 2) :]
    room = max_length - len(prompt_ids)
    if len(ids) + len(end) > room:
        ids, harmful, end = ids[:room], harmful[:room], []
    return Encoded(
        input_ids=prompt_ids + ids + end,
        response_mask=[False] * len(prompt_ids) + [True] * (len(ids) + len(end)),
        harmful_mask=[False] * len(prompt_ids) + harmful + [False] * len(end),
    )


def collate(encoded: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; masks are shifted to line up with next-token logits.

    ``labels[:, t]`` is the token that ``logits[:, t]`` predicts (``input_ids[:, t + 1]``), and
    ``response_mask`` / ``harmful_mask`` are the masks of those labels.
    """
    width = max(len(e.input_ids) for e in encoded)

    def pad(values: list, fill: Any) -> list:
        return values + [fill] * (width - len(values))

    ids = torch.tensor([pad(e.input_ids, pad_token_id) for e in encoded])
    attention = torch.tensor([pad([1] * len(e.input_ids), 0) for e in encoded])
    response = torch.tensor([pad(e.response_mask, False) for e in encoded])
    harmful = torch.tensor([pad(e.harmful_mask, False) for e in encoded])
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": ids[:, 1:],
        "response_mask": response[:, 1:],
        "harmful_mask": harmful[:, 1:],
    }


def _encode_column(
    tokenizer: Any, rows: Sequence[dict[str, Any]], column: str, max_length: int, *, marked: bool
) -> list[Encoded]:
    """One response column of every row; ``marked`` reads the rows' ``harmful_spans`` too."""
    return [
        encode_response(
            tokenizer,
            r["prompt"],
            text_of(r[column], column),
            max_length=max_length,
            harmful_spans=spans_of(r.get("harmful_spans")) if marked else (),
        )
        for r in rows
    ]


def encode_pairs(
    tokenizer: Any, rows: Sequence[dict[str, Any]], *, max_length: int
) -> dict[str, torch.Tensor]:
    """Chosen responses first, then rejected ones, in one batch (one forward pass for both).

    Pairs may carry ``harmful_spans`` into the *rejected* text (the combined recipe marks them):
    they become the rejected rows' ``harmful_mask``.
    """
    chosen = _encode_column(tokenizer, rows, "chosen", max_length, marked=False)
    rejected = _encode_column(tokenizer, rows, "rejected", max_length, marked=True)
    return collate(chosen + rejected, tokenizer.pad_token_id)


def encode_triples(
    tokenizer: Any, rows: Sequence[dict[str, Any]], *, max_length: int
) -> dict[str, torch.Tensor]:
    """Positive responses first, then toxic ones with their harmful marks, in one batch."""
    positive = _encode_column(tokenizer, rows, "positive", max_length, marked=False)
    toxic = _encode_column(tokenizer, rows, "toxic", max_length, marked=True)
    return collate(positive + toxic, tokenizer.pad_token_id)


def spans_of(value: Any) -> list[tuple[int, int]]:
    """``harmful_spans`` as ``[(start, end), ...]``, checked."""
    if value is None:
        return []
    spans = []
    for span in list(value):
        span = list(span)
        if len(span) != 2 or not all(isinstance(v, (int, np.integer)) for v in span):
            raise MalformedPairError(f"harmful span {span!r} must be [start, end] integers")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end:
            raise MalformedPairError(f"harmful span {span!r} must have 0 <= start < end")
        spans.append((start, end))
    return spans
