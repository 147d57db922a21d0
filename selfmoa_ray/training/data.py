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

Tokenised once per stage input (:func:`tokenize`; the reference pass stores the token columns
beside the pairs, as TRL's preprocessing does), then only padded per batch (:func:`collate`).

A response is encoded as the prompt's chat template (with the generation prompt), then the
response tokens, then the template's end-of-turn token, so the model also learns where to stop.
Only response and end-of-turn positions are trained on; harmful marks land only on response
tokens, never on template or special tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from selfmoa_ray.training.losses import IGNORE_INDEX

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


SIDES: dict[str, tuple[str, str]] = {
    "pairs": ("chosen", "rejected"),
    "triples": ("positive", "toxic"),
}
# Per-row scalar columns that travel with the tokens into a training batch (float32 tensors).
SCALAR_COLUMNS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_chosen_logps_avg",
    "ref_rejected_logps_avg",
    "safety_delta",
    "chosen_safety",
    "chosen_helpfulness",
    "rejected_safety",
    "rejected_helpfulness",
)


def kind_of(columns: Sequence[str]) -> str:
    """``triples`` (PT-ALIGN: positive/toxic) or ``pairs`` (chosen/rejected), from the columns."""
    return "triples" if "positive" in columns else "pairs"


TOKEN_PARTS = {
    "input_ids": pa.list_(pa.int32()),  # chat template + response + end-of-turn
    "prompt_len": pa.int32(),  # where the response starts
    "harmful": pa.list_(pa.bool_()),  # per response token: marked harmful
}


def token_columns(kind: str) -> dict[str, pa.DataType]:
    """The columns :func:`tokenize` adds, with their Arrow types: each part for each side."""
    return {f"{side}_{part}": t for side in SIDES[kind] for part, t in TOKEN_PARTS.items()}


def token_arrays(tokens: dict[str, list], kind: str) -> dict[str, pa.Array]:
    """:func:`tokenize`'s columns as typed Arrow arrays, to store beside the rows."""
    return {name: pa.array(tokens[name], t) for name, t in token_columns(kind).items()}


class TokenizeRows:
    """Callable class for ``map_batches`` (Arrow in, Arrow out): adds the token columns to rows
    that have none yet (PT-ALIGN triples, or pairs from elsewhere), loading the tokenizer once."""

    def __init__(self, model: str, kind: str, max_length: int):
        from selfmoa_ray.sources.models import load_tokenizer

        self.tokenizer = load_tokenizer(model)
        self.kind, self.max_length = kind, max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        tokens = tokenize(
            self.tokenizer, batch.to_pylist(), kind=self.kind, max_length=self.max_length
        )
        for name, values in token_arrays(tokens, self.kind).items():
            if name in batch.column_names:
                batch = batch.drop_columns([name])
            batch = batch.append_column(name, values)
        return batch


def tokenize(
    tokenizer: Any, rows: Sequence[dict[str, Any]], *, kind: str, max_length: int
) -> dict[str, list]:
    """Token columns of every row, computed once per stage input (the reference pass stores them
    beside the pairs; the trainer only pads). The second side of each row (``rejected``, ``toxic``)
    carries the row's ``harmful_spans`` as token marks."""
    first, second = SIDES[kind]
    out: dict[str, list] = {column: [] for column in token_columns(kind)}
    for side, marked in ((first, False), (second, True)):
        for r in rows:
            e = encode_response(
                tokenizer,
                r["prompt"],
                text_of(r[side], side),
                max_length=max_length,
                harmful_spans=spans_of(r.get("harmful_spans")) if marked else (),
            )
            start = e.response_mask.index(True)
            out[f"{side}_input_ids"].append(e.input_ids)
            out[f"{side}_prompt_len"].append(start)
            out[f"{side}_harmful"].append(e.harmful_mask[start:])
    return out


def collate(batch: Mapping[str, Any], *, pad_token_id: int) -> dict[str, Any]:
    """Token columns of a batch (``{column: values}``) -> one padded forward batch of both sides.

    First side's rows first, then the second side's, so one forward pass serves both. Prompts are
    left-padded and responses right-padded (TRL's layout), so every response starts at the same
    column P and the model computes logits only from P - 1 on (``logits_to_keep``): the lm_head
    and log-softmax over 49k vocabulary entries are skipped for every prompt position. Left
    padding needs explicit ``position_ids`` (from the attention mask).

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` (N, P + R); ``labels`` (N, R, -100
    off the responses), ``response_mask`` and ``harmful_mask`` (N, R), with ``labels[:, t]``
    predicted by the logits of the t-th kept position; ``logits_to_keep`` (R + 1); the rows'
    scalar columns (``SCALAR_COLUMNS``) as float32 tensors.
    """
    kind = "triples" if "positive_input_ids" in batch else "pairs"
    sequences, starts, harmful = [], [], []
    for side in SIDES[kind]:
        sequences += [np.asarray(ids, dtype=np.int64) for ids in batch[f"{side}_input_ids"]]
        starts += [int(n) for n in batch[f"{side}_prompt_len"]]
        harmful += [np.asarray(h, dtype=bool) for h in batch[f"{side}_harmful"]]
    width_prompt = max(starts)
    width_response = max(len(ids) - n for ids, n in zip(sequences, starts, strict=True))
    rows = len(sequences)
    input_ids = np.full((rows, width_prompt + width_response), pad_token_id, dtype=np.int64)
    attention = np.zeros_like(input_ids)
    labels = np.full((rows, width_response), IGNORE_INDEX, dtype=np.int64)
    response = np.zeros((rows, width_response), dtype=bool)
    marks = np.zeros((rows, width_response), dtype=bool)
    for i, (ids, n, h) in enumerate(zip(sequences, starts, harmful, strict=True)):
        tail = len(ids) - n
        input_ids[i, width_prompt - n : width_prompt + tail] = ids
        attention[i, width_prompt - n : width_prompt + tail] = 1
        labels[i, :tail] = ids[n:]
        response[i, :tail] = True
        marks[i, : len(h)] = h
    attention_mask = torch.from_numpy(attention)
    out: dict[str, Any] = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "labels": torch.from_numpy(labels),
        "response_mask": torch.from_numpy(response),
        "harmful_mask": torch.from_numpy(marks),
        "logits_to_keep": width_response + 1,
    }
    for column in SCALAR_COLUMNS:
        if column in batch:
            out[column] = torch.as_tensor(np.asarray(batch[column], dtype=np.float32))
    return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device``; other values (``logits_to_keep``) as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def encode_rows(
    tokenizer: Any, rows: Sequence[dict[str, Any]], *, kind: str, max_length: int
) -> dict[str, Any]:
    """Rows of pairs or triples -> a forward batch (:func:`tokenize`, then :func:`collate`)."""
    columns: dict[str, Any] = tokenize(tokenizer, rows, kind=kind, max_length=max_length)
    for column in (*SCALAR_COLUMNS, "harmful_spans"):
        if rows and all(column in r for r in rows):
            columns[column] = [r[column] for r in rows]
    return collate(columns, pad_token_id=tokenizer.pad_token_id)


def encode_pairs(
    tokenizer: Any, rows: Sequence[dict[str, Any]], *, max_length: int
) -> dict[str, Any]:
    """Chosen responses first, then rejected ones, in one batch (one forward pass for both).

    Pairs may carry ``harmful_spans`` into the *rejected* text (the combined recipe marks them):
    they become the rejected rows' ``harmful_mask``.
    """
    return encode_rows(tokenizer, rows, kind="pairs", max_length=max_length)


def encode_triples(
    tokenizer: Any, rows: Sequence[dict[str, Any]], *, max_length: int
) -> dict[str, Any]:
    """Positive responses first, then toxic ones with their harmful marks, in one batch."""
    return encode_rows(tokenizer, rows, kind="triples", max_length=max_length)


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


def mixed_order(groups: Sequence[Any], seed: int) -> np.ndarray:
    """A row order in which every group's rows are spread evenly over the epoch.

    Pairs arrive sorted by id, attacks before benign prompts: trained in that order, the first
    three quarters of an epoch only ever prefer refusing, and the benign pairs that teach when
    not to refuse come last (the demo's validation trace: 75% of validation attacks and 41% of
    benign prompts refused a third of the way in). Here each group (a pair's ``split``) is
    shuffled with ``seed`` and its k-th of n rows placed at (k + u) / n, u a random offset per
    group, so every stretch of rows holds each group in its share. Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    keys = np.asarray(groups, dtype=object)
    position = np.empty(len(keys))
    for key in sorted(set(keys.tolist()), key=str):
        rows = np.flatnonzero(keys == key)
        rng.shuffle(rows)
        position[rows] = (np.arange(len(rows)) + rng.random()) / len(rows)
    return np.argsort(position, kind="stable")


def in_training_order(table: pa.Table, order: str, seed: int) -> pa.Table:
    """``table``'s rows as the trainer will meet them (``train.order``): ``mixed`` spreads each
    ``split`` over the epoch (:func:`mixed_order`; one group where there is no such column),
    ``file`` keeps them as they are."""
    if order == "file":
        return table
    groups = table["split"].to_pylist() if "split" in table.column_names else [0] * len(table)
    return table.take(mixed_order(groups, seed))
