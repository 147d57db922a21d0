"""Next-token probabilities of chosen answers: how classifier-style judges read a chat model.

Llama Guard answers "safe" or "unsafe"; the probability mass on the first token of each is a
calibrated score, better than the sampled word (Llama Guard model card). The same trick turns any
chat model into a yes/no judge.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def first_token_ids(tokenizer, candidates: Sequence[str]) -> list[int]:
    """The first token of each candidate answer, as the model would emit it after the prompt."""
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in candidates]
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"candidates {list(candidates)} share a first token; cannot tell them apart"
        )
    return ids


@torch.inference_mode()
def next_token_probs(
    model, tokenizer, prompts: Sequence[str], candidates: Sequence[str], batch_size: int = 8
) -> np.ndarray:
    """P(candidate's first token | prompt), renormalised over the candidates: shape (n, k).

    ``prompts`` are already templated text. Left padding keeps every prompt's last token in the
    final position, so one forward pass per batch reads all next-token distributions.
    """
    ids = first_token_ids(tokenizer, candidates)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            logits = model(**enc.to(model.device)).logits[:, -1, :].float()
            picked = torch.log_softmax(logits, dim=-1)[:, ids]
            out.append(torch.softmax(picked, dim=-1).cpu().numpy())
    finally:
        tokenizer.padding_side = side
    return np.concatenate(out) if out else np.zeros((0, len(ids)), dtype=np.float32)
