"""transformers backend: batched, left-padded chat generation on CPU or GPU.

One instance lives in each Ray Data actor and keeps its model loaded across batches: loading
is the expensive part (docs/design.md 5.1), so actors are reused, never recreated per batch.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from selfmoa_ray.engines.base import SamplingParams, explode, prompt_text, rows_of
from selfmoa_ray.engines.hf_core import HFCore, batch_seed, rows_per_prompt, seed_torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Cache layers that hold only keys and values, so repeating them along the batch copies everything.
REPEATABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


class HFChatEngine:
    """Callable class for ``map_batches``: ``{column: array}`` batch in, one row per sample out.

    Loading, tokenising, decoding keywords and answer cutting are the shared core's
    (engines/hf_core.py, also under the policy Serve app); the row contract, shared prefill and
    per-batch seeds are this engine's.
    """

    def __init__(
        self,
        model: str,
        sampling: SamplingParams,
        *,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        num_threads: int | None = None,
    ):
        self.core = HFCore(
            model, dtype=dtype, trust_remote_code=trust_remote_code, num_threads=num_threads
        )
        self.sampling = sampling
        self._forward_parameters = set(inspect.signature(self.model.forward).parameters)

    # The core's model, tokenizer and device, under the names callers and tests read.
    @property
    def model(self) -> PreTrainedModel:
        return self.core.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.core.tokenizer

    @property
    def device(self) -> str:
        return self.core.device

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
        enc = self.core.encode(prompts).to(self.device)
        # Seeded by the batch's content, not once per actor: the same seed for every batch would
        # draw the same random numbers at the same positions of different batches.
        seed_torch(batch_seed(p.seed, prompts))
        new_tokens, per_prompt = self.new_tokens(enc, shared_prefill=shared_prefill)
        prompt_lengths = enc["attention_mask"].sum(dim=1).cpu()
        # The tokenizer's EOS only (the policy app also cuts at the generation config's).
        eos = self.tokenizer.eos_token_id
        answers = self.core.answers(
            new_tokens, n=p.n, rows=per_prompt, eos_ids=() if eos is None else (eos,)
        )
        return [
            [
                {
                    "sample_index": j,
                    "response": answer.text.strip(),
                    "prompt_tokens": int(prompt_lengths[i]),
                    "response_tokens": answer.tokens,
                    "finish_reason": "stop" if answer.eos else "length",
                }
                for j, answer in enumerate(samples)
            ]
            for i, samples in enumerate(answers)
        ]

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
        # Greedy samples are decoded once and repeated, unless the cache already holds n rows.
        per_prompt = p.n if cache is not None else rows_per_prompt(p)
        new = self.core.generate(
            enc["input_ids"], enc["attention_mask"], p, rows=per_prompt, past_key_values=cache
        )
        return new, per_prompt

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
