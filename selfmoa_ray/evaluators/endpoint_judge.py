"""A judge behind an OpenAI-compatible endpoint (``kind: endpoint``), through the openai SDK.

* ``mode: chat``: a chat model answers the rubric template for each pair (the same templates and
  parsing as the local rubric judge: rubric_template.py), so a hosted model can grade safety,
  refusal and helpfulness. Columns ``<name>_safety``/``_refusal``/``_helpfulness`` as the template
  asks, and ``<name>_score`` with helpfulness.
* ``mode: moderation``: ``POST {base_url}/moderations`` with the responses as ``input``;
  ``<name>_safety`` = 1 - the highest category score (1 or 0 from ``flagged`` when the endpoint
  gives no scores), ``<name>_flagged`` and ``<name>_category`` (the top category of a flagged
  answer, else "").

The key is read from the variable ``api_key_env`` names (never written in a config): by the judge
stage in the driver, which checks the endpoint and hands the key to its actors (evaluators/pool.py),
or where the judge is built (the evaluator app's replica). Requests run ``concurrency`` at a time
with the SDK's retries and backoff (connection errors, 408/409/429/5xx). A pair the endpoint
refuses to judge (400/413/422: a vendor's content filter, an over-long text) is NaN, counted on
stderr; a batch it refuses entirely, a refused key, an unknown model or an unreachable endpoint
fail with the reason, since every score would otherwise be silently missing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import openai

from selfmoa_ray.config import EndpointSection, EvaluatorSection
from selfmoa_ray.evaluators.base import check_pairs
from selfmoa_ray.evaluators.rubric_template import (
    asked,
    fill,
    provides_of,
    resolve_template,
    rubric_columns,
)

T = TypeVar("T")
MODERATION_CHUNK = 16  # responses per moderation request
UNJUDGEABLE = (400, 413, 422)  # statuses that concern one pair, not the endpoint


class EndpointJudgeError(ValueError):
    """An endpoint judge that cannot score: unreachable, refusing the key or every request."""


def endpoint_of(spec: EvaluatorSection) -> EndpointSection:
    """The judge's endpoint as the policy's endpoint section, for the shared checks."""
    return EndpointSection(
        base_url=spec.base_url,
        model=spec.model or "default",
        api_key_env=spec.api_key_env,
        max_retries=spec.max_retries,
    )


def connect(spec: EvaluatorSection) -> str | None:
    """The judge's API key (from ``api_key_env``), once the endpoint answered with it and (when a
    model is set) serves that model: engines/endpoint.py ``check_endpoint``. The judge stage calls
    it in the driver and hands the key to its actors, which may not share the driver's
    environment (evaluators/pool.py)."""
    from selfmoa_ray.engines.endpoint import check_endpoint

    return check_endpoint(endpoint_of(spec), check_model=spec.model is not None)


class EndpointJudge:
    """Evaluator (evaluators/base.py) asking an OpenAI-compatible endpoint."""

    def __init__(self, spec: EvaluatorSection, key: str | None):
        """``key``: what :func:`connect` returned (None: send no key)."""
        if spec.kind != "endpoint" or spec.mode is None or spec.base_url is None:
            raise ValueError(f"not an endpoint judge's section: {spec}")
        self.spec, self.name, self.url = spec, spec.label, spec.base_url.rstrip("/")
        self.client = openai.OpenAI(
            base_url=self.url,
            api_key=key or "none",
            timeout=spec.timeout_s,
            max_retries=spec.max_retries,
        )
        self.pool = ThreadPoolExecutor(spec.concurrency, thread_name_prefix="endpoint-judge")
        if spec.mode == "chat":
            self.template = resolve_template(spec.template)
            self.quantities = asked(self.template)
            self.provides = provides_of(self.name, self.quantities)
        else:
            self.provides = {"safety": f"{self.name}_safety"}

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        prompts, responses = check_pairs(prompts, responses)
        if self.spec.mode == "chat":
            requests = [fill(self.template, p, r) for p, r in zip(prompts, responses, strict=True)]
            answers = self._each(self._chat, requests)
            return rubric_columns(self.name, answers, self.quantities)
        chunks = [
            responses[i : i + MODERATION_CHUNK] for i in range(0, len(responses), MODERATION_CHUNK)
        ]
        answered = self._each(self._moderate, chunks)
        return self._moderation_columns(_aligned(chunks, answered))

    # ------------------------------------------------------------------ requests

    def _each(self, ask: Callable[[Any], T], items: Sequence[Any]) -> list[T | None]:
        """``ask`` for each item, ``concurrency`` at a time; None where the endpoint refused
        the item, an error when it refused all of them."""
        outcomes = list(self.pool.map(lambda item: self._attempt(ask, item), items))
        refused = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
        if refused and len(refused) == len(items):
            raise EndpointJudgeError(
                f"{self.url} refused every request of the batch ({len(items)}); the first: "
                f"{refused[0].status_code} {refused[0].message}"
            )
        if refused:
            print(
                f"[judge] {self.url}: {len(refused)} of {len(items)} requests refused (NaN), "
                f"e.g. {refused[0].status_code} {refused[0].message[:200]}",
                file=sys.stderr,
                flush=True,
            )
        return [None if isinstance(o, openai.APIStatusError) else o for o in outcomes]

    def _attempt(self, ask: Callable[[Any], T], item: Any) -> T | openai.APIStatusError:
        try:
            return ask(item)
        except openai.APIStatusError as err:
            if err.status_code in UNJUDGEABLE:
                return err
            raise EndpointJudgeError(
                f"{self.url} answered {err.status_code}: {err.message}"
            ) from None
        except openai.APIConnectionError as err:  # timeouts too, after the retries
            raise EndpointJudgeError(f"cannot reach {self.url}: {err}") from None

    def _chat(self, request: str) -> str:
        completion = self.client.chat.completions.create(
            model=self.spec.model or "",
            messages=[{"role": "user", "content": request}],
            temperature=0.0,
            max_tokens=self.spec.max_tokens,
        )
        if not completion.choices:
            raise EndpointJudgeError(f"{self.url} answered without a completion: {completion}")
        return completion.choices[0].message.content or ""

    def _moderate(self, texts: list[str]) -> list[Any]:
        extra = {"model": self.spec.model} if self.spec.model else {}
        results = list(self.client.moderations.create(input=texts, **extra).results)
        if len(results) != len(texts):
            raise EndpointJudgeError(
                f"{self.url}/moderations gave {len(results)} results for {len(texts)} inputs"
            )
        return results

    # ------------------------------------------------------------------ columns

    def _moderation_columns(self, results: list[Any]) -> dict[str, np.ndarray]:
        n = len(results)
        safety = np.full(n, np.nan, dtype=np.float32)
        flagged = np.zeros(n, dtype=bool)
        category = np.array([""] * n, dtype=object)
        for i, result in enumerate(results):
            if result is None:
                continue
            scores = _category_scores(result)
            flagged[i] = bool(result.flagged)
            if scores:
                top = max(scores, key=scores.__getitem__)
                safety[i] = 1.0 - min(max(scores[top], 0.0), 1.0)
                category[i] = top if flagged[i] else ""
            else:
                safety[i] = 0.0 if flagged[i] else 1.0
        return {
            f"{self.name}_safety": safety,
            f"{self.name}_flagged": flagged,
            f"{self.name}_category": category,
        }

    def __del__(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _category_scores(result: Any) -> dict[str, float]:
    """The category scores of one moderation result as the endpoint named them."""
    scores = getattr(result, "category_scores", None)
    raw = scores.to_dict() if hasattr(scores, "to_dict") else dict(scores or {})
    return {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float))}


def _aligned(chunks: list[list[str]], answered: list[list[Any] | None]) -> list[Any]:
    """One moderation result per response; None for each response of a refused chunk."""
    return [
        result
        for chunk, results in zip(chunks, answered, strict=True)
        for result in (results if results is not None else [None] * len(chunk))
    ]
