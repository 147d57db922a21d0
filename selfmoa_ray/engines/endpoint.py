"""Endpoint backend: the policy is an OpenAI-compatible URL, not weights (audits of deployed models).

The same contract as the other engines (engines/base.py): prompt rows in, one row per sample out,
with ``sample_index``, ``response``, ``prompt_tokens``, ``response_tokens`` and ``finish_reason``.
Requests go through Ray Data's own HTTP processor (``ray.data.llm.HttpRequestProcessorConfig``):
its actors send ``POST {base_url}/chat/completions`` with retries and backoff on 408/429/5xx and an
optional QPS cap, so a vendor's rate limits are respected.

Before any row is sent, :func:`check_endpoint` asks the endpoint for its models: an unreachable
URL, a refused key or a model the endpoint does not serve fail at once, with the reason, rather
than as a failed Ray task after minutes of work.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import openai
import ray.data
from ray.data.llm import HttpRequestProcessorConfig, build_processor

from selfmoa_ray.config import EndpointSection
from selfmoa_ray.engines.base import PROMPT, SamplingParams, chat_of, raw_prompt

# The request actors wait on the network, not the CPU: a quarter core each leaves room beside the
# judge's actors on a small machine.
HTTP_ACTOR_CPUS = 0.25


class EndpointError(ValueError):
    """An endpoint that cannot be used: unreachable, refusing the key, or not serving the model."""


def api_key(endpoint: EndpointSection) -> str | None:
    """The key from ``endpoint.api_key_env`` (read on the driver, never stored in a run folder)."""
    if endpoint.api_key_env is None:
        return None
    key = os.environ.get(endpoint.api_key_env, "").strip()
    if not key:
        raise EndpointError(
            f"the endpoint {endpoint.base_url} needs an API key in ${endpoint.api_key_env}; set it, "
            "or set api_key_env to another variable (null sends no key)"
        )
    return key


def check_endpoint(endpoint: EndpointSection, *, check_model: bool = True) -> str | None:
    """Fail fast, with the reason, on an endpoint that cannot answer (or, with ``check_model``,
    does not serve ``endpoint.model``); returns the API key."""
    key = api_key(endpoint)
    client = openai.OpenAI(
        base_url=endpoint.base_url, api_key=key or "none", max_retries=1, timeout=30
    )
    try:
        served = [m.id for m in client.models.list()]
    except openai.AuthenticationError as err:
        source = f"${endpoint.api_key_env}" if endpoint.api_key_env else "no key"
        raise EndpointError(
            f"{endpoint.base_url} refused the API key ({source}): {err.status_code}"
        ) from None
    except openai.NotFoundError:
        return key  # some vendors do not list models; the first request will tell
    except openai.APIConnectionError as err:
        raise EndpointError(f"cannot reach {endpoint.base_url}: {err}") from None
    except openai.APIStatusError as err:
        raise EndpointError(
            f"{endpoint.base_url}/models answered {err.status_code}: {err.message}"
        ) from None
    if check_model and served and endpoint.model not in served:
        raise EndpointError(
            f"{endpoint.base_url} does not serve the model {endpoint.model!r}; it serves: "
            + ", ".join(served)
        )
    return key


def fan_out(
    row: dict[str, Any], *, model: str, sampling: SamplingParams
) -> Iterator[dict[str, Any]]:
    """One request row per sample (one in all when greedy: the n answers would be the same).

    Each sample carries its own seed, so a sampled run is reproducible where the endpoint honours
    ``seed`` (vLLM and ours do) and its samples differ from one another.
    """
    if raw_prompt(row) is not None:
        raise EndpointError(
            f"prompt row id={row.get('id')!r} is a raw '{PROMPT}' (completion mode, no chat "
            "template): an endpoint speaks chat only; send 'text' or 'messages', or use a local "
            "engine (engine.backend hf or vllm)"
        )
    payload: dict[str, Any] = {
        "model": model,
        "messages": chat_of(row),
        "max_tokens": sampling.max_new_tokens,
        "temperature": max(sampling.temperature, 0.0),
    }
    if sampling.greedy:
        yield {**row, "sample_index": -1, "payload": payload}
        return
    for i in range(sampling.n):
        yield {**row, "sample_index": i,
               "payload": {**payload, "top_p": sampling.top_p, "seed": sampling.seed + i}}  # fmt: skip


def answer_of(response: Any, url: str) -> dict[str, Any]:
    """The contract's output columns from one chat-completion response body."""
    choices = response.get("choices") if isinstance(response, dict) else None
    if not choices:
        error = response.get("error") if isinstance(response, dict) else None
        detail = error.get("message", error) if isinstance(error, dict) else error or response
        raise EndpointError(f"{url} answered without a completion: {str(detail)[:300]}")
    choice, usage = choices[0], response.get("usage") or {}
    return {
        # Stripped, as the local engines do: the judge sees the same text either way.
        "response": ((choice.get("message") or {}).get("content") or "").strip(),
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "response_tokens": int(usage.get("completion_tokens") or 0),
        # The contract knows "stop" and "length"; a vendor's "content_filter" ends the answer too.
        "finish_reason": "length" if choice.get("finish_reason") == "length" else "stop",
    }


def generate_via_endpoint(
    ds: ray.data.Dataset, endpoint: EndpointSection, sampling: SamplingParams
) -> ray.data.Dataset:
    """Rows with ``id`` and ``text``/``messages`` in; one row per sample out (engines/base.py)."""
    key = check_endpoint(endpoint)
    columns = ds.columns()
    url = endpoint.base_url.rstrip("/") + "/chat/completions"
    config = HttpRequestProcessorConfig(
        url=url,
        headers={"Authorization": f"Bearer {key}"} if key else None,
        concurrency=endpoint.concurrency,
        batch_size=endpoint.batch_size,
        qps=endpoint.qps,
        max_retries=endpoint.max_retries,
        http_request_stage={"num_cpus": HTTP_ACTOR_CPUS},
    )

    def outputs(row: dict[str, Any]) -> dict[str, Any]:
        kept = {c: row[c] for c in columns}
        return {**kept, "sample_index": row["sample_index"], **answer_of(row["http_response"], url)}

    def repeat_greedy(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if row["sample_index"] >= 0:
            yield row
            return
        for i in range(sampling.n):
            yield {**row, "sample_index": i}

    requests = ds.flat_map(fan_out, fn_kwargs={"model": endpoint.model, "sampling": sampling})
    processor = build_processor(config, postprocess=outputs)
    return processor(requests).flat_map(repeat_greedy)
