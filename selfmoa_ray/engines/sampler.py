"""The next-token draw by inverse CDF: the distribution ``generate`` samples from, at a fraction of
its cost on CPU.

``torch.multinomial`` draws one exponential variate per vocabulary entry for every sequence at
every step: on a 2-core CPU, 110 ms per step for 96 sequences over SmolLM2's 49,152 tokens, a
quarter of all decoding time (``benchmarks/README.md``, "The next-token draw"). One uniform number
per sequence, looked up in the cumulative distribution, draws from the same distribution in 4 ms.

``generate`` has no hook for the draw itself, so the draw is a logits processor run under greedy
decoding: it scores the drawn token 0 and every other token -inf, and greedy's argmax takes it.
Temperature and top-p are transformers' own warpers, applied first, so the distribution is exactly
the one ``do_sample=True`` would sample; only the random numbers behind each draw differ.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper


class InverseCdfDraw(LogitsProcessor):
    """Draws one token per row from ``softmax(scores)``; returns it as a one-hot score."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1:]
        if not torch.isfinite(total).all() or (total <= 0).any():
            raise ValueError(
                "the next-token distribution holds inf or nan (e.g. a temperature so small that "
                "logits / temperature overflows)"
            )
        # u in [0, total): the token whose CDF interval [cdf[i-1], cdf[i]) holds u, which is
        # never a zero-probability token (its interval is empty)
        u = torch.rand(total.shape, device=cdf.device, dtype=cdf.dtype) * total
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        # rounding can put u at the very top of the CDF; take the most likely token there
        unlikely = probs.gather(-1, token) == 0
        if unlikely.any():
            token = torch.where(unlikely, probs.argmax(dim=-1, keepdim=True), token)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


def decoding(*, greedy: bool, temperature: float, top_p: float) -> dict[str, Any]:
    """``generate`` keywords that pick each next token: argmax, or a draw at ``temperature``
    from the top-``top_p`` nucleus. Both decode greedily, so ``num_return_sequences`` must stay
    1: repeat the inputs instead (``input_ids.repeat_interleave(n, dim=0)``)."""
    common = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if greedy:
        return common
    warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(temperature)]
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return {**common, "logits_processor": LogitsProcessorList([*warpers, InverseCdfDraw()])}
