"""A reward model (sequence classification) as the helpfulness judge.

Reward models score a whole (prompt, response) chat with one logit; a logistic squash puts it in
[0, 1] so it combines with the other judges. ``scale`` sets how many logits span the middle of that
range (reward models differ in spread; 1.0 suits most Bradley-Terry reward models). With the
packaged or tiny models here the head is untrained: the path runs, the scores mean nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from selfmoa_ray.evaluators.base import check_pairs
from selfmoa_ray.precision import resolve_dtype
from selfmoa_ray.sources.models import load_tokenizer, resolve_model


class RewardModelEvaluator:
    """Evaluator (evaluators/base.py): ``reward_model_helpfulness`` and the raw ``..._logit``."""

    name = "reward_model"
    provides = {"helpfulness": "reward_model_helpfulness"}

    def __init__(
        self, model: str, *, dtype: str = "float32", batch_size: int = 8, scale: float = 1.0
    ):
        from transformers import AutoModelForSequenceClassification

        resolved = resolve_model(model)
        self.tokenizer = load_tokenizer(resolved)
        self.tokenizer.padding_side = "right"
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            resolved.path, num_labels=1, dtype=getattr(torch, resolve_dtype(dtype, self.device)),
            trust_remote_code=resolved.trust_remote_code,
        ).to(self.device).eval()  # fmt: skip
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.scale = batch_size, scale

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        prompts, responses = check_pairs(prompts, responses)
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                tokenize=False,
            )
            for p, r in zip(prompts, responses, strict=True)
        ]
        logits = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                truncation=True, max_length=2048, add_special_tokens=False,
            ).to(self.device)  # fmt: skip
            logits.append(self.model(**enc).logits[:, 0].float().cpu().numpy())
        raw = np.concatenate(logits) if logits else np.zeros(0, dtype=np.float32)
        return {
            "reward_model_logit": raw.astype(np.float32),
            "reward_model_helpfulness": (1.0 / (1.0 + np.exp(-raw / self.scale))).astype(
                np.float32
            ),
        }
