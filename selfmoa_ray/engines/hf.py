"""transformers backend: batched, left-padded chat generation on CPU or GPU.

One instance lives in each Ray Data actor and keeps its model loaded across batches: loading
is the expensive part (design.md 5.1), so actors are reused, never recreated per batch.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from selfmoa_ray.engines.base import SamplingParams, explode, prompt_text, rows_of
from selfmoa_ray.engines.sampler import decoding
from selfmoa_ray.sources.models import load_model_and_tokenizer

# Cache layers that hold only keys and values, so repeating them along the batch copies everything.
REPEATABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


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
        self._forward_parameters = set(inspect.signature(self.model.forward).parameters)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = rows_of(batch)
        # malformed rows fail here, before any generation; raw prompts skip the chat template
        prompts = [prompt_text(r, self.tokenizer) for r in rows]
        return explode(list(batch), rows, self.generate(prompts))

    @torch.inference_mode()
    def generate(
        self, prompts: list[str], *, shared_prefill: bool | None = None
    ) -> list[list[dict[str, Any]]]:
        """``n`` samples for each already-templated prompt.

        ``shared_prefill`` (default: when sampling ``n > 1``) prefills each prompt once and
        decodes its ``n`` samples from copies of that cache; ``True`` forces it, also for greedy
        decoding, which is how the tests check it against the plain path token for token.
        """
        p = self.sampling
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.device)
        # Seeded by the batch's content, not once per actor: the same seed for every batch would
        # draw the same random numbers at the same positions of different batches.
        torch.manual_seed(batch_seed(p.seed, prompts))
        new_tokens, per_prompt = self.new_tokens(enc, shared_prefill=shared_prefill)
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

    @torch.inference_mode()
    def new_tokens(
        self, enc: Any, *, shared_prefill: bool | None = None
    ) -> tuple[torch.Tensor, int]:
        """The generated ids of a tokenised batch (pads and EOS included), on the CPU, with the
        rows each prompt has: ``n``, or 1 when greedy samples are decoded once and repeated.

        Rows ``i * per_prompt .. (i + 1) * per_prompt - 1`` belong to prompt ``i``, as with
        ``num_return_sequences``. ``shared_prefill``: see :meth:`generate`.
        """
        p = self.sampling
        if shared_prefill is None:
            shared_prefill = p.n > 1 and not p.greedy
        cache = self._shared_prefill(enc, p.n) if shared_prefill else None
        # Greedy samples are all identical: decode once, then repeat the result n times.
        per_prompt = p.n if cache is not None or not p.greedy else 1
        generated = self.model.generate(
            input_ids=enc["input_ids"].repeat_interleave(per_prompt, dim=0),
            attention_mask=enc["attention_mask"].repeat_interleave(per_prompt, dim=0),
            past_key_values=cache,
            **self._decoding(),
        )
        return generated[:, enc["input_ids"].shape[1] :].cpu(), per_prompt

    def _decoding(self) -> dict[str, Any]:
        """``generate`` keywords for the configured sampling."""
        p = self.sampling
        return {
            "max_new_tokens": p.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            **decoding(greedy=p.greedy, temperature=p.temperature, top_p=p.top_p),
        }

    def _shared_prefill(self, enc: Any, n: int) -> DynamicCache | None:
        """The KV cache of every prompt but its last token, computed once and repeated ``n`` times.

        ``num_return_sequences=n`` repeats the prompts before the prefill, which then costs ``n``
        times over (most of the time for long guided prompts on CPU). The last token is left for
        ``generate``, whose first step needs its logits. ``None`` where sharing does not apply:
        nothing to prefill (one-token prompts), or a model whose cache layers hold more than keys
        and values (e.g. linear-attention states, which ``batch_repeat_interleave`` would not copy).
        """
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if ids.shape[1] < 2:
            return None
        cache = DynamicCache(config=self.model.config)
        if any(type(layer) not in REPEATABLE_LAYERS for layer in cache.layers):
            return None
        head, head_mask = ids[:, :-1], mask[:, :-1]
        # generate's own positions for left padding: real tokens count from 0, pads sit at 0
        positions = (head_mask.long().cumsum(-1) - 1).masked_fill(head_mask == 0, 0)
        # logits of the last position only (the rest are never read), where the model allows it
        keep = {"logits_to_keep": 1} if "logits_to_keep" in self._forward_parameters else {}
        self.model(
            input_ids=head,
            attention_mask=head_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **keep,
        )
        cache.batch_repeat_interleave(n)
        return cache
