"""The transformers generation core under both local chat generators: ``HFChatEngine`` (batches of
prompt rows, engines/hf.py) and the policy Serve app's ``HFGenerator`` (one OpenAI request at a
time, serve_apps/policy.py).

Why one module: the batch pipeline and the served policy must answer alike for the same model,
prompt and settings, so loading (threads, device, dtype), tokenising, the ``generate`` keywords of
a sampling setting, seeding and cutting an answer at its EOS are written once, here. What only one
caller needs stays with it: the engine's row contract, shared prefill and per-batch seeds; the
app's stop sequences, cancellation, streaming and request seeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.sampler import decoding
from selfmoa_ray.sources.models import load_model_and_tokenizer, load_tokenizer, resolve_model

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedTokenizerBase


def batch_seed(seed: int, prompts: list[str]) -> int:
    """A seed for one batch: reproducible (whichever actor runs it) and distinct per batch."""
    digest = hashlib.sha256("\x00".join(prompts).encode()).digest()
    return (seed + int.from_bytes(digest[:8], "little")) % 2**63


def seed_torch(seed: int | None) -> None:
    """Seed torch's global generator (CPU and CUDA) for the next draws; ``None`` leaves it as the
    last generation left it. Global state: meaningful only with one generation at a time."""
    if seed is not None:
        torch.manual_seed(seed)


def rows_per_prompt(sampling: SamplingParams) -> int:
    """Rows to decode per prompt for ``sampling.n`` samples: greedy samples are all identical, so
    they are decoded once and repeated."""
    return 1 if sampling.greedy else sampling.n


@dataclass(frozen=True)
class Answer:
    """One generated sample, cut at its first EOS: the ids kept (pads dropped), their text
    (special tokens skipped, not stripped), and whether an EOS ended it."""

    ids: list[int]
    text: str
    eos: bool

    @property
    def tokens(self) -> int:
        """Tokens generated: the ids kept, plus the EOS when there was one."""
        return len(self.ids) + int(self.eos)


class HFCore:
    """A causal LM and its tokenizer, loaded once, generating with ``model.generate``.

    The tokenizer (padding on the left: decoder-only models continue from the right edge) must
    not be used by two threads at once; :meth:`new_tokenizer` gives another one.
    """

    def __init__(
        self,
        spec: str,
        *,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        num_threads: int | None = None,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.source = resolve_model(spec, trust_remote_code=trust_remote_code)
        self.model, self.tokenizer = load_model_and_tokenizer(
            self.source, dtype=dtype, device=self.device
        )
        self.tokenizer.padding_side = "left"

    def new_tokenizer(self) -> PreTrainedTokenizerBase:
        """Another tokenizer of the model, for another thread."""
        tokenizer = load_tokenizer(self.source)
        tokenizer.padding_side = "left"
        return tokenizer

    def eos_ids(self) -> frozenset[int]:
        """Every id that ends an answer: the generation config's EOS (one id or a list), which
        ``generate`` stops at, and the tokenizer's."""
        config_eos = self.model.generation_config.eos_token_id
        eos = config_eos if isinstance(config_eos, list) else [config_eos]
        return frozenset(int(t) for t in [*eos, self.tokenizer.eos_token_id] if t is not None)

    def encode(
        self, prompts: list[str], tokenizer: PreTrainedTokenizerBase | None = None
    ) -> BatchEncoding:
        """Prompt texts (templated chats, or raw text continued as is) as one left-padded batch,
        on the CPU. No special tokens are added: a chat template writes its own."""
        tokenizer = tokenizer or self.tokenizer
        return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def encode_chat(
        self, chat: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase | None = None
    ) -> torch.Tensor:
        """The prompt ids (1 x n) of a chat in the model's template, with a new assistant turn
        opened after it, also after an assistant turn (OpenAI's reading of a chat). Prompt rows
        of the batch engines continue such a turn instead (``base.prompt_text``)."""
        tokenizer = tokenizer or self.tokenizer
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        return self.encode([text], tokenizer)["input_ids"]

    def decoding(self, sampling: SamplingParams) -> dict[str, Any]:
        """``generate`` keywords for ``sampling``: its token budget, the pad id, and argmax or a
        draw at its temperature and top-p (engines/sampler.py)."""
        return {
            "max_new_tokens": sampling.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            **decoding(
                greedy=sampling.greedy, temperature=sampling.temperature, top_p=sampling.top_p
            ),
        }

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        sampling: SamplingParams,
        *,
        rows: int = 1,
        **extra: Any,
    ) -> torch.Tensor:
        """The generated ids (pads and EOS included) of each prompt, repeated ``rows`` times (row
        ``i * rows + j`` is prompt ``i``'s ``j``-th), on the CPU. The mask defaults to all ones
        (unpadded prompts); ``extra`` are more ``generate`` keywords (a cache, stopping criteria,
        a streamer). Seeding is the caller's (:func:`seed_torch`)."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = input_ids.new_ones(input_ids.shape)
        generated = self.model.generate(
            input_ids=input_ids.repeat_interleave(rows, dim=0),
            attention_mask=attention_mask.to(self.device).repeat_interleave(rows, dim=0),
            **self.decoding(sampling),
            **extra,
        )
        return generated[:, input_ids.shape[1] :].cpu()

    def answer(self, ids: list[int], eos_ids: Collection[int]) -> Answer:
        """Generated ``ids`` cut at the first of ``eos_ids``, without pads, and decoded."""
        eos_at = next((i for i, t in enumerate(ids) if t in eos_ids), None)
        pad = self.tokenizer.pad_token_id
        kept = [t for t in (ids if eos_at is None else ids[:eos_at]) if t != pad]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Answer(kept, text, eos=eos_at is not None)

    def answers(
        self, new_tokens: torch.Tensor, *, n: int, rows: int, eos_ids: Collection[int]
    ) -> list[list[Answer]]:
        """``n`` answers per prompt from :meth:`generate`'s ids with ``rows`` rows per prompt
        (fewer than ``n``: greedy rows, repeated)."""
        return [
            [self.answer(new_tokens[i * rows + j % rows].tolist(), eos_ids) for j in range(n)]
            for i in range(new_tokens.shape[0] // rows)
        ]
