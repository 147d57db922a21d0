"""An LLM rubric judge: a local chat model rates each pair from a prompt template.

The template is ``templates/rubric.txt`` (helpfulness 1-10) unless config gives one (``template:``,
inline text or a file, with ``{prompt}`` and ``{response}`` slots); a template may also ask for
safety and refusal. Filling and parsing are rubric_template.py's, shared with the endpoint chat
judge (endpoint_judge.py). Answers without the value asked for are NaN, never silently turned
into a number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.hf import HFChatEngine
from selfmoa_ray.evaluators.base import check_pairs
from selfmoa_ray.evaluators.rubric_template import (
    DEFAULT_TEMPLATE,
    asked,
    fill,
    parse_score,
    provides_of,
    resolve_template,
    rubric_columns,
)

__all__ = ["DEFAULT_TEMPLATE", "RubricJudge", "parse_score"]
TOKENS_PER_ANSWER = 8  # "Score: 10" and the like, per quantity asked


class RubricJudge:
    """Evaluator (evaluators/base.py): ``rubric_helpfulness`` in [0, 1] from a 1-10 rating, and
    ``rubric_safety`` / ``rubric_refusal`` when the template asks for them."""

    name = "rubric"

    def __init__(
        self,
        model: str,
        *,
        template: str | None = None,
        dtype: str = "float32",
        batch_size: int = 8,
    ):
        """``template``: text with {prompt} and {response} slots, or a file holding it."""
        self.template, self.batch_size = resolve_template(template), batch_size
        self.quantities = asked(self.template)
        self.provides = provides_of(self.name, self.quantities)
        tokens = TOKENS_PER_ANSWER * len(self.quantities)
        self.engine = HFChatEngine(
            model, SamplingParams(n=1, temperature=0.0, max_new_tokens=tokens), dtype=dtype
        )

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        prompts, responses = check_pairs(prompts, responses)
        tok = self.engine.tokenizer
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": fill(self.template, p, r)}],
                add_generation_prompt=True, tokenize=False,
            )
            for p, r in zip(prompts, responses, strict=True)
        ]  # fmt: skip
        answers = [
            samples[0]["response"]
            for start in range(0, len(texts), self.batch_size)
            for samples in self.engine.generate(texts[start : start + self.batch_size])
        ]
        return rubric_columns(self.name, answers, self.quantities)
