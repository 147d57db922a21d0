"""OpenAI's moderation API (``POST /v1/moderations``) on the evaluator app's judge.

Request ``{"input": str | [str], "model": optional}``; answer ``{"id", "model", "results"}`` with,
per input, ``flagged``, ``categories`` (name -> bool), ``category_scores`` (name -> float in
[0, 1], higher = worse) and ``category_applied_input_types`` (name -> ["text"]), so that
``openai.OpenAI(...).moderations.create(...)`` and tools built on it read it as they read
OpenAI's. The categories are the ones the configured judge can actually give, not OpenAI's
thirteen (no evaluator here scores "harassment" or "violence/graphic" on its own):

* ``unsafe``: 1 - the composite safety of the evaluators that judge safety (probe, Llama Guard,
  rubric...); flagged when safety < the judge's ``unsafe_threshold``;
* ``harm`` (the probe): its harm head's estimate of how harmful the content is;
* Llama Guard's hazards (``violent_crimes`` = S1 ... ``code_interpreter_abuse`` = S14, in
  ``HAZARD_NAMES``): Llama Guard gives one probability, P(unsafe), and names the hazards of what
  it judges unsafe; a named hazard scores P(unsafe) and is flagged, the others score 0.

An evaluator with a ``name:`` of its own prefixes its categories (``guard2/hate``). ``flagged``
is true when any category is. Each input is judged as a model's *response* (with an empty
prompt): the content itself, as the probe's harm head and Llama Guard's check of the agent's turn
rate it. A judge with no evaluator of safety (the refusal matcher alone) cannot moderate text:
the route answers 404 ``moderation_unavailable`` rather than results it did not judge.
"""

# No ``from __future__ import annotations``: the request model is built per deployment and FastAPI
# reads its annotations at runtime.

import math
import re
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# The Llama Guard 3 hazard codes by category name (selfmoa_ray.evaluators.llama_guard.HAZARDS,
# which imports torch: a test checks that the two agree).
HAZARD_NAMES: dict[str, str] = {
    "violent_crimes": "S1", "non_violent_crimes": "S2", "sex_related_crimes": "S3",
    "child_sexual_exploitation": "S4", "defamation": "S5", "specialized_advice": "S6",
    "privacy": "S7", "intellectual_property": "S8", "indiscriminate_weapons": "S9",
    "hate": "S10", "suicide_self_harm": "S11", "sexual_content": "S12", "elections": "S13",
    "code_interpreter_abuse": "S14",
}  # fmt: skip
MAX_MODEL_CHARS = 256


def hazard_slug(name: str) -> str:
    """ "Suicide & Self-Harm" -> "suicide_self_harm": a Llama Guard hazard as a category key."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def model_name(judge_config: str) -> str:
    """The ``model`` a moderation answer names: ``selfmoa-<judge config>`` (``selfmoa-demo``)."""
    label = Path(judge_config).name
    return "selfmoa-" + (label.rsplit(".", 1)[0] if label.endswith((".yaml", ".yml")) else label)


# --------------------------------------------------------------------------- schemas


class Moderation(BaseModel):
    flagged: bool = Field(description="any category is flagged")
    categories: dict[str, bool]
    category_scores: dict[str, float] = Field(description="in [0, 1], higher = worse")
    category_applied_input_types: dict[str, list[Literal["text"]]]


class ModerationsResponse(BaseModel):
    id: str = Field(description="modr-<hex>")
    model: str = Field(description="selfmoa-<judge config>")
    results: list[Moderation] = Field(description="one per input, in order")


@lru_cache(maxsize=8)
def request_model(max_items: int, max_chars: int) -> type[BaseModel]:
    """The request, carrying this deployment's limits (``max_batch_items``, ``max_chars``)."""
    text = Annotated[str, StringConstraints(max_length=max_chars)]

    class ModerationsRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid",
            strict=True,
            json_schema_extra={"examples": [{"input": ["Sure, here is how...", "Hello!"]}]},
        )
        input: text | Annotated[list[text], Field(min_length=1, max_length=max_items)] = Field(
            description=f"a text, or up to {max_items} texts, each judged as a model's response"
        )
        model: str | None = Field(
            None, max_length=MAX_MODEL_CHARS, description="selfmoa-<judge config>, if given"
        )

    return ModerationsRequest


# --------------------------------------------------------------------------- categories


class Categories:
    """Turns the evaluator app's rows into moderation results for one judge."""

    def __init__(self, evaluators: list[Any], unsafe_threshold: float):
        """``evaluators``: the app's ``EvaluatorInfo`` list (name, kind, provides, weight)."""
        self.evaluators = evaluators
        self.limit = 1.0 - unsafe_threshold  # a score above it is flagged, as safety below
        self.available = any(e.weight > 0 and "safety" in e.provides for e in evaluators)

    @staticmethod
    def _key(evaluator: Any, category: str) -> str:
        return category if evaluator.name == evaluator.kind else f"{evaluator.name}/{category}"

    def result(self, row: dict[str, Any]) -> dict[str, Any]:
        """One moderation result from one scored row (``EvaluatorDeployment._rows``)."""
        scores: dict[str, float] = {}
        flags: dict[str, bool] = {}
        if not math.isnan(row["safety"]):  # NaN: no evaluator could judge this text
            scores["unsafe"], flags["unsafe"] = 1.0 - row["safety"], bool(row["unsafe"])
        details = row.get("evaluators") or {}
        for evaluator in self.evaluators:
            columns = details.get(evaluator.name) or {}
            if evaluator.kind == "probe" and isinstance(columns.get("harm"), float):
                key = self._key(evaluator, "harm")
                scores[key] = columns["harm"]
                flags[key] = columns["harm"] > self.limit
            elif evaluator.kind == "llama_guard":
                p_unsafe = columns.get("p_unsafe")
                named = set(str(columns.get("category") or "").split(","))
                for slug, code in HAZARD_NAMES.items():
                    key = self._key(evaluator, slug)
                    flags[key] = code in named
                    scores[key] = float(p_unsafe) if flags[key] and p_unsafe is not None else 0.0
        scores = {k: min(max(v, 0.0), 1.0) for k, v in scores.items()}
        return {
            "flagged": any(flags.values()),
            "categories": flags,
            "category_scores": scores,
            "category_applied_input_types": {k: ["text"] for k in flags},
        }


def response(model: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": f"modr-{uuid.uuid4().hex}", "model": model, "results": results}
