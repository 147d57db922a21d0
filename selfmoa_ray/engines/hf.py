"""transformers backend: batched, left-padded chat generation on CPU or GPU.

One instance lives in each Ray Data actor and keeps its model loaded across batches: loading
is the expensive part (design.md 5.1), so actors are reused, never recreated per batch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from selfmoa_ray.engines.base import SamplingParams, chat_of, explode, rows_of
from selfmoa_ray.sources.models import load_model_and_tokenizer


def batch_seed(seed: int, prompts: list[str]) -> int:
    """A seed for one batch: reproducible (whichever actor runs it) and distinct per batch."""
    digest = hashlib.sha256("\x00".join(prompts).encode()).digest()
    return (seed + int.from_bytes(digest[:8], "little")) % 2**63


class HFChatEngine:
    """Callable class for ``map_batches``: ``{column: array}`` batch in, one row per sample out."""

    def __init__(
        self,
        model: str,
        sampling: SamplingParams,
        *,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        num_threads: int | None = None,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_model_and_tokenizer(
            model, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        self.tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
        self.sampling = sampling
        self.device = device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = rows_of(batch)
        chats = [chat_of(r) for r in rows]  # malformed rows fail here, before any generation
        prompts = [
            self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            for chat in chats
        ]
        return explode(list(batch), rows, self.generate(prompts))

    @torch.inference_mode()
    def generate(self, prompts: list[str]) -> list[list[dict[str, Any]]]:
        """``n`` samples for each already-templated prompt."""
        p = self.sampling
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.device)
        # Seeded by the batch's content, not once per actor: the same seed for every batch would
        # draw the same random numbers at the same positions of different batches.
        torch.manual_seed(batch_seed(p.seed, prompts))
        # Greedy samples are all identical: decode once, then repeat the result n times.
        per_prompt = 1 if p.greedy else p.n
        generated = self.model.generate(
            **enc,
            max_new_tokens=p.max_new_tokens,
            do_sample=not p.greedy,
            temperature=p.temperature if not p.greedy else None,
            top_p=p.top_p if not p.greedy else None,
            top_k=None,
            num_return_sequences=per_prompt,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new_tokens = generated[:, enc["input_ids"].shape[1] :].cpu()
        prompt_lengths = enc["attention_mask"].sum(dim=1).cpu()
        eos = self.tokenizer.eos_token_id
        results: list[list[dict[str, Any]]] = []
        for i in range(len(prompts)):
            samples = []
            for j in range(p.n):
                ids = new_tokens[i * per_prompt + j % per_prompt].tolist()
                stopped = eos in ids
                ids = ids[: ids.index(eos)] if stopped else ids
                ids = [t for t in ids if t != self.tokenizer.pad_token_id]
                samples.append(
                    {
                        "sample_index": j,
                        "response": self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                        "prompt_tokens": int(prompt_lengths[i]),
                        "response_tokens": len(ids) + int(stopped),
                        "finish_reason": "stop" if stopped else "length",
                    }
                )
            results.append(samples)
        return results
