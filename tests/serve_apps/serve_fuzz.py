"""Request bodies for fuzzing the Serve apps, and what every answer to them must satisfy.

Bodies are built field by field from each request schema, mostly well-typed with values around
and beyond each limit, sometimes with one field replaced by an arbitrary JSON value (wrong types,
nulls, nested junk), a required field dropped or a stray key added: near-valid requests reach
generation and scoring, which random bytes never do. Hypothesis draws them from a
fixed seed (``derandomize``), so a run is reproducible and its budget fixed.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from serve_apps.errors import ErrorResponse

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def fuzz_settings(max_examples: int) -> settings:
    """A fixed budget, a fixed seed, no example database, no per-example deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def mostly(valid: st.SearchStrategy, edge: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` three draws in four, else ``edge`` (values around and beyond the limits).
    (``st.one_of(valid, valid, valid, edge)`` would not do: it draws its distinct branches alike.)"""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: valid if ok else edge)


def bodies(
    required: dict[str, st.SearchStrategy], optional: dict[str, st.SearchStrategy] | None = None
) -> st.SearchStrategy[dict[str, Any]]:
    """JSON objects from a schema's fields: mostly well-typed (so that requests get past the
    request model, to generation or scoring), else with one field replaced by any JSON value, a
    required field dropped, or a key the schema does not know."""
    optional = optional or {}
    base = st.fixed_dictionaries(required, optional=optional)
    keys = sorted({*required, *optional})
    variants = [
        st.builds(lambda b, k, v: {**b, k: v}, base, st.sampled_from(keys), JSON),
        st.builds(lambda b, k, v: {**b, k: v}, base, st.text(min_size=1, max_size=8), JSON),
    ]
    if required:
        drop = st.sampled_from(sorted(required))
        variants.append(st.builds(lambda b, k: {x: y for x, y in b.items() if x != k}, base, drop))
    return mostly(base, st.one_of(variants))


def documented_statuses(http: httpx.Client, path: str) -> set[int]:
    spec = http.get("/openapi.json").json()
    return {int(code) for code in spec["paths"][path]["post"]["responses"]}


def check_answer(
    response: httpx.Response, documented: set[int], answer_model: type[BaseModel]
) -> None:
    """No server error; a status the OpenAPI document lists; errors in the one JSON shape; a
    success that parses as the documented answer (or, streamed, events that end in [DONE])."""
    status, text = response.status_code, response.text
    assert status < 500, (status, text[:500])
    assert status in documented, (status, sorted(documented), text[:500])
    if status >= 400:  # OpenAI's error shape, every key present
        body = response.json()
        ErrorResponse.model_validate(body)
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", text[-300:]
        assert not any("error" in json.loads(e) for e in events[:-1]), text[:500]
        return
    answer_model.model_validate(response.json())


def no_trace(text: str) -> bool:
    """No Python traceback, file or module path leaked into an answer."""
    return "Traceback" not in text and 'File "' not in text and ".py" not in text


def openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """The error of ``r``: OpenAI's shape exactly, with ``status``, its type and ``code``."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert code is None or error["code"] == code, error
    assert no_trace(r.text)
    return error
