"""An LLM rubric judge: any chat model rates helpfulness from 1 to 10 with a prompt template.

The template lives in ``templates/rubric.txt`` (or any file given in config), with ``{prompt}`` and
``{response}`` slots. The first "Score: N" (or first integer 1-10) in the answer is the score;
answers without one are NaN and counted, never silently turned into a number.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.hf import HFChatEngine
from selfmoa_ray.evaluators.base import check_pairs

DEFAULT_TEMPLATE = resources.files("selfmoa_ray.evaluators").joinpath("templates/rubric.txt")
_SCORE = re.compile(r"score\s*[:=]?\s*(\d{1,2})", re.IGNORECASE)
_NUMBER = re.compile(r"\b(10|[1-9])\b")


def parse_score(text: str) -> float:
    """The 1-10 score in a judge's answer, or NaN when there is none."""
    match = _SCORE.search(text) or _NUMBER.search(text)
    if match is None:
        return float("nan")
    value = int(match.group(1))
    return float(value) if 1 <= value <= 10 else float("nan")


class RubricJudge:
    """Evaluator (evaluators/base.py): ``rubric_helpfulness`` in [0, 1] from a 1-10 rating."""

    name = "rubric"
    provides = {"helpfulness": "rubric_helpfulness"}

    def __init__(
        self,
        model: str,
        *,
        template: str | None = None,
        dtype: str = "float32",
        batch_size: int = 8,
    ):
        text = Path(template).read_text() if template else DEFAULT_TEMPLATE.read_text()
        if "{prompt}" not in text or "{response}" not in text:
            raise ValueError("a rubric template needs both {prompt} and {response} slots")
        try:
            text.format(prompt="", response="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"rubric template has a slot other than {{prompt}}/{{response}}: {err}"
            ) from None
        self.template, self.batch_size = text, batch_size
        self.engine = HFChatEngine(
            model, SamplingParams(n=1, temperature=0.0, max_new_tokens=8), dtype=dtype
        )

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        prompts, responses = check_pairs(prompts, responses)
        tok = self.engine.tokenizer
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": self.template.format(prompt=p, response=r)}],
                add_generation_prompt=True, tokenize=False,
            )
            for p, r in zip(prompts, responses, strict=True)
        ]  # fmt: skip
        answers = [
            samples[0]["response"]
            for start in range(0, len(texts), self.batch_size)
            for samples in self.engine.generate(texts[start : start + self.batch_size])
        ]
        raw = np.array([parse_score(a) for a in answers], dtype=np.float32)
        return {"rubric_score": raw, "rubric_helpfulness": (raw - 1.0) / 9.0}
