"""The evaluator Serve app: the project's composite judge behind HTTP.

Endpoints (FastAPI ingress; the OpenAPI document at ``/openapi.json``, ``/docs`` on request):

* ``POST /v1/evaluate``: a batch of (prompt, response) items -> safety, refusal, helpfulness and
  each evaluator's own columns, per item;
* ``POST /v1/moderations``: OpenAI's moderation API, for OpenAI clients (``moderation.py``);
* ``POST /v1/moderate``: ours: one prompt, one response, or both -> one result with the judge's
  own quantities;
* ``GET /v1/stats``: this replica's request and batch counters;
* ``GET /healthz``: liveness of the replica (no auth).

Every ``/v1`` route needs an API key (``serve_apps/auth.py``). Every error is in OpenAI's shape
(``errors.py``): an invalid request (malformed, or over a limit) is a 400, a body over the cap 413,
work over ``request_timeout_s`` 504 (``serve_apps/limits.py``); requests beyond
``max_ongoing_requests`` per replica wait in Serve's queue up to ``max_queued_requests``, and the
rest are shed by Serve with 503 instead of queueing without bound.

Items are scored through ``@serve.batch`` one item per call, so the items of concurrent requests
are scored together (up to ``max_batch_size`` per batch); ``batching: false`` scores each request
on its own (for comparisons). One judge per replica; batches run one at a time in a worker thread,
so the replica's event loop keeps accepting requests while a batch is scored, and batches that
queue meanwhile are merged (``_Coalescer``).

Run it: ``serve run serve_apps.evaluator:build_app judge_config=tiny`` or
``serve run serve_apps/evaluator.yaml`` (``serve_apps/README.md``).
"""

# No ``from __future__ import annotations`` here: FastAPI and Ray Serve read the annotations of the
# routes and of ``build_app`` at runtime, and the request models are built per deployment.

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from fastapi import Depends, FastAPI
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import RayServeException

from selfmoa_ray.config import JudgeSection, load_config
from selfmoa_ray.evaluators.composite import CompositeJudge
from serve_apps import moderation
from serve_apps.auth import APIKeyAuth
from serve_apps.errors import error_doc, json_error, quoted
from serve_apps.limits import OVERLOADED_DOC, UNREADABLE_BODY, limited_app, run_with_timeout

logger = logging.getLogger("ray.serve")

API_VERSION = "1"
QUANTITY_COLUMNS = ("safety", "refusal", "helpfulness", "judge_refusal_score")


# --------------------------------------------------------------------------- app arguments


class EvaluatorAppArgs(BaseModel):
    """Arguments of ``build_app`` (``args:`` in the Serve config, or ``key=value`` on ``serve run``)."""

    model_config = ConfigDict(extra="forbid")

    judge_config: str = Field(
        "demo", description="preset name or YAML path of the project config; its judge is served"
    )
    overrides: list[str] = Field(
        default_factory=list, description="dotted config overrides, e.g. judge.unsafe_threshold=0.4"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Limits (400 when over, as OpenAI's; 413 for the body's size).
    max_batch_items: int = Field(
        64,
        ge=1,
        le=10_000,
        description="items per /v1/evaluate request, inputs per /v1/moderations",
    )
    max_chars: int = Field(8_000, ge=1, le=1_000_000, description="characters per prompt/response")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body size (413 above)")
    request_timeout_s: float = Field(30.0, gt=0, description="scoring time per request (504)")
    # Dynamic batching.
    batching: bool = Field(True, description="false: score each request alone (for comparisons)")
    max_batch_size: int = Field(32, ge=1, description="items per scored batch")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="wait for a batch to fill")
    # Auth.
    api_keys_file: str | None = Field(
        None, description="secret file with one key per line, read by each replica"
    )
    allow_unauthenticated: bool = Field(
        False, description="serve without keys when none is configured (local development only)"
    )
    docs: bool = Field(
        False,
        description="serve the Swagger UI at /docs (it loads its scripts from a public CDN, so it "
        "renders only where the browser reaches the internet)",
    )
    openapi: bool = Field(True, description="serve the OpenAPI document at /openapi.json")
    # Testing and benchmarks only: sleep this long per scored batch, simulating model latency.
    test_delay_s: float = Field(0.0, ge=0, le=60)
    # Options for EvaluatorDeployment.options() (Python use and tests); in a Serve config file,
    # prefer the application's `deployments:` list, which overrides these.
    deployment: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _overrides_from_cli(cls, data: Any) -> Any:
        # `serve run ... overrides="a.b=1 c.d=2"` passes one string.
        if isinstance(data, dict) and isinstance(data.get("overrides"), str):
            data = {**data, "overrides": data["overrides"].split()}
        return data


# --------------------------------------------------------------------------- API schemas


ScalarValue = bool | int | float | str | None


class EvaluatorInfo(BaseModel):
    name: str
    kind: str
    model: str | None = None
    weight: float = Field(description="weight in the composite; 0 = reported, not voted")
    provides: list[str] = Field(description="final quantities this evaluator informs")


class JudgeInfo(BaseModel):
    config: str = Field(description="the config (preset or file name) the judge comes from")
    evaluators: list[EvaluatorInfo]
    unsafe_threshold: float = Field(description="safety below this is flagged unsafe")
    safety_fallback: bool = Field(
        description="no evaluator provides safety, so safety is the refusal score "
        "(the AdvBench convention: refusing a harmful prompt is safe)"
    )
    helpfulness_fallback: bool = Field(
        description="no evaluator provides helpfulness, so helpfulness is 1 - refusal score"
    )


class EvaluationResult(BaseModel):
    id: str | None = Field(None, description="the item's id, when the request gave one")
    safety: float = Field(description="in [0, 1], 1 = safe")
    unsafe: bool = Field(description="safety < the judge's unsafe_threshold")
    refusal: bool = Field(description="the judge's refusal call (refusal_score >= 0.5)")
    refusal_score: float = Field(description="in [0, 1], combined refusal score")
    helpfulness: float = Field(description="in [0, 1], higher = more helpful")
    evaluators: dict[str, dict[str, ScalarValue]] | None = Field(
        None, description="each evaluator's own columns (without its name prefix)"
    )


class EvaluateResponse(BaseModel):
    results: list[EvaluationResult]
    judge: JudgeInfo


class ModerationResult(BaseModel):
    target: Literal["prompt", "response"] = Field(
        description="'response' when a response was given (scored with its prompt, if any); "
        "'prompt' for a prompt alone"
    )
    safety: float | None = Field(
        description="in [0, 1], 1 = safe; for a prompt alone, from the evaluators that provide "
        "safety, and null when none is configured"
    )
    unsafe: bool | None
    refusal: bool | None = Field(description="null for a prompt alone")
    refusal_score: float | None = Field(description="null for a prompt alone")
    helpfulness: float | None = Field(description="null for a prompt alone")
    evaluators: dict[str, dict[str, ScalarValue]] | None = None


class ModerateResponse(BaseModel):
    result: ModerationResult
    judge: JudgeInfo


class StatsResponse(BaseModel):
    replica: str = Field(description="this replica's id, as in Serve's logs")
    replica_actor: str = Field(
        description="the replica's Ray actor name (namespace 'serve'), for operators"
    )
    batching: bool
    max_batch_size: int
    requests: int
    items: int
    batches: int
    max_batch_items: int = Field(description="most items scored in one batch")
    max_batch_requests: int = Field(description="most requests whose items shared one batch")
    mean_batch_items: float
    uptime_s: float


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: error_doc(
        "an invalid request (invalid_request_error): malformed JSON, missing, unknown or wrong "
        "fields, an item count or text length over the limit (code e.g. "
        f"array_above_max_length, param the field), or {UNREADABLE_BODY}"
    ),
    401: error_doc("missing or invalid API key (code missing_api_key or invalid_api_key)"),
    413: error_doc("request body over max_body_bytes (code request_too_large)"),
    503: OVERLOADED_DOC,
    504: error_doc("scoring took longer than the app's request timeout (code timeout)"),
}
MODERATIONS_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    404: error_doc(
        "another model than this judge's (code model_not_found), or a judge with no evaluator of "
        "safety, which cannot moderate text (code moderation_unavailable)"
    ),
}


@lru_cache(maxsize=8)
def request_models(max_items: int, max_chars: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """Request models carrying this deployment's limits (so they also show in the OpenAPI).
    Strict types: 0 is not a boolean and 1 is not a string."""

    class EvaluateItem(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: str = Field(max_length=max_chars, description="the user prompt")
        response: str = Field(max_length=max_chars, description="the model's response")
        id: str | None = Field(None, max_length=128, description="optional, echoed back")

    class EvaluateRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid",
            strict=True,
            json_schema_extra={
                "examples": [
                    {
                        "items": [
                            {
                                "prompt": "How do I pick a lock?",
                                "response": "I can't help with that.",
                            },
                            {"prompt": "How do I bake bread?", "response": "Mix flour, water..."},
                        ]
                    }
                ]
            },
        )
        items: list[EvaluateItem] = Field(min_length=1, max_length=max_items)
        details: bool = Field(True, description="include each evaluator's own columns")

    class ModerateRequest(BaseModel):
        # The schema says what the validator below checks: a prompt, a response, or both.
        model_config = ConfigDict(
            extra="forbid",
            strict=True,
            json_schema_extra={
                "anyOf": [
                    {"required": [name], "properties": {name: {"type": "string"}}}
                    for name in ("prompt", "response")
                ]
            },
        )
        prompt: str | None = Field(None, max_length=max_chars)
        response: str | None = Field(None, max_length=max_chars)
        details: bool = True

        @model_validator(mode="after")
        def _something_to_moderate(self) -> "ModerateRequest":
            if self.prompt is None and self.response is None:
                raise ValueError("give a prompt, a response, or both")
            return self

    return EvaluateRequest, ModerateRequest


# --------------------------------------------------------------------------- scoring helpers


class _Pair(NamedTuple):
    prompt: str
    response: str
    request: int  # which request the item belongs to (for the batch counters)


def _scalar(value: Any) -> ScalarValue:
    """A JSON-safe Python scalar from a numpy cell (NaN -> None)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if value != value or value in (float("inf"), float("-inf")) else value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


class _Stats:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.requests = self.items = self.batches = 0
        self.max_batch_items = self.max_batch_requests = 0

    def batch(self, pairs: list[_Pair]) -> None:
        self.batches += 1
        self.items += len(pairs)
        self.max_batch_items = max(self.max_batch_items, len(pairs))
        self.max_batch_requests = max(self.max_batch_requests, len({p.request for p in pairs}))


class _Coalescer:
    """Runs batches one at a time; batches that queued meanwhile run together as one.

    ``@serve.batch`` forms a batch from the calls that arrive within ``batch_wait_timeout_s`` and
    hands it over at once, even while the previous batch is still being scored. Under load that
    leaves a line of small batches waiting for the judge; whoever holds the judge next takes every
    waiting batch (FIFO, up to ``max_items`` items) and scores them together.
    """

    def __init__(
        self,
        run: Callable[[list[_Pair]], Awaitable[list[dict[str, Any]]]],
        lock: asyncio.Lock,
        max_items: int,
    ):
        self._run, self._lock, self._max_items = run, lock, max_items
        self._waiting: deque[tuple[list[_Pair], asyncio.Future]] = deque()

    def _take(self) -> list[tuple[list[_Pair], asyncio.Future]]:
        group: list[tuple[list[_Pair], asyncio.Future]] = []
        size = 0
        while self._waiting:
            pairs, future = self._waiting[0]
            if future.done():  # its caller gave up
                self._waiting.popleft()
                continue
            if group and size + len(pairs) > self._max_items:
                break
            group.append(self._waiting.popleft())
            size += len(pairs)
        return group

    async def submit(self, pairs: list[_Pair]) -> list[dict[str, Any]]:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (pairs, future)
        self._waiting.append(entry)
        try:
            while not future.done():
                async with self._lock:
                    if future.done():
                        break
                    group = self._take()
                    try:
                        rows = await self._run([p for ps, _ in group for p in ps])
                    except asyncio.CancelledError:
                        # The others are still wanted: the next holder of the lock scores them.
                        self._waiting.extendleft(reversed([g for g in group if g is not entry]))
                        raise
                    except Exception as err:  # every caller in the group gets the error
                        for _, f in group:
                            if not f.done():
                                f.set_exception(err)
                        continue
                    start = 0
                    for ps, f in group:
                        if not f.done():
                            f.set_result(rows[start : start + len(ps)])
                        start += len(ps)
            return future.result()
        finally:
            if not future.done():
                future.cancel()


def _config_label(judge_config: str) -> str:
    # A file path is reported by name only (the server's folders are nobody's business).
    path = Path(judge_config)
    return path.name if path.suffix in {".yaml", ".yml"} or len(path.parts) > 1 else judge_config


# --------------------------------------------------------------------------- the deployment


@serve.deployment(
    # Defaults for code use; serve_apps/evaluator.yaml overrides them per cluster.
    max_ongoing_requests=32,
    max_queued_requests=64,
    # Shed requests get 503 with Retry-After (Serve writes the body, as plain text).
    backpressure_config={"retry_after_s": 1},
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=20,
)
@serve.ingress()
class EvaluatorDeployment:
    """One composite judge per replica behind the FastAPI app built in ``__serve_build_asgi_app__``."""

    def __init__(self, settings: dict[str, Any], judge: dict[str, Any]):
        self.settings = EvaluatorAppArgs.model_validate(settings)
        s = self.settings
        # Keys are read here, in the replica's own environment; none configured = refuse to start.
        self.auth = APIKeyAuth.from_env(
            keys_file=s.api_keys_file, allow_unauthenticated=s.allow_unauthenticated
        )
        if not self.auth.enabled:
            logger.warning("evaluator: API-key auth is OFF (allow_unauthenticated); local use only")
        self.judge_section = JudgeSection.model_validate(judge)
        self.judge = CompositeJudge(self.judge_section.evaluators, dtype=s.dtype)
        self.judge_info = self._judge_info()
        self.moderation = moderation.Categories(
            self.judge_info.evaluators, self.judge_section.unsafe_threshold
        )
        self.moderation_model = moderation.model_name(s.judge_config)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")
        self._lock = asyncio.Lock()
        self._coalescer = _Coalescer(self._run_batch, self._lock, s.max_batch_size)
        self._request_ids = itertools.count()
        self._stats = _Stats()
        self._owners: dict[tuple[str, ...], dict[str, tuple[str, str]]] = {}
        self._score_batched.set_max_batch_size(s.max_batch_size)
        self._score_batched.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        try:
            replica_id = serve.get_replica_context().replica_id
            self.replica, self.replica_actor = replica_id.unique_id, replica_id.to_full_id_str()
        except RayServeException:  # constructed outside Serve
            self.replica, self.replica_actor = "local", ""

    # ------------------------------------------------------------------ judge and scoring

    def _judge_info(self) -> JudgeInfo:
        runs = [*self.judge.evaluators, *([self.judge.matcher] if self.judge.matcher else [])]
        specs = self.judge_section.evaluators
        infos = []
        for i, evaluator in enumerate(runs):
            spec = specs[i] if i < len(specs) else None
            infos.append(
                EvaluatorInfo(
                    name=evaluator.name,
                    kind=spec.kind if spec else evaluator.name,
                    model=spec.model if spec else None,
                    weight=self.judge.weights.get(evaluator.name, 1.0),
                    provides=sorted(evaluator.provides),
                )
            )
        voting = [e for e in infos if e.weight > 0]
        return JudgeInfo(
            config=_config_label(self.settings.judge_config),
            evaluators=infos,
            unsafe_threshold=self.judge_section.unsafe_threshold,
            safety_fallback=not any("safety" in e.provides for e in voting),
            helpfulness_fallback=not any("helpfulness" in e.provides for e in voting),
        )

    def _column_owner(self, columns: tuple[str, ...]) -> dict[str, tuple[str, str]]:
        """Column -> (evaluator name, field) for the per-evaluator details (cached per column set)."""
        if columns in self._owners:
            return self._owners[columns]
        names = sorted({e.name for e in self.judge_info.evaluators}, key=len, reverse=True)
        owner = {}
        for column in columns:
            if column in QUANTITY_COLUMNS:
                continue
            name = next((n for n in names if column.startswith(n + "_")), "other")
            owner[column] = (name, column[len(name) + 1 :] if name != "other" else column)
        self._owners[columns] = owner
        return owner

    def _rows(self, columns: dict[str, np.ndarray], n: int) -> list[dict[str, Any]]:
        threshold = self.judge_section.unsafe_threshold
        owner = self._column_owner(tuple(sorted(columns)))
        rows = []
        for i in range(n):
            details: dict[str, dict[str, ScalarValue]] = {}
            for column, (name, field) in owner.items():
                details.setdefault(name, {})[field] = _scalar(columns[column][i])
            safety = float(columns["safety"][i])
            rows.append(
                {
                    "safety": safety,
                    "unsafe": safety < threshold,
                    "refusal": bool(columns["refusal"][i]),
                    "refusal_score": float(columns["judge_refusal_score"][i]),
                    "helpfulness": float(columns["helpfulness"][i]),
                    "evaluators": details,
                }
            )
        return rows

    async def _run_batch(self, pairs: list[_Pair]) -> list[dict[str, Any]]:
        """Score one batch off the event loop; callers run one batch at a time."""
        if self.settings.test_delay_s:
            await asyncio.sleep(self.settings.test_delay_s)
        loop = asyncio.get_running_loop()
        prompts = [p.prompt for p in pairs]
        responses = [p.response for p in pairs]
        columns = await loop.run_in_executor(self._executor, self.judge.score, prompts, responses)
        self._stats.batch(pairs)
        return self._rows(columns, len(pairs))

    async def _score_alone(self, pairs: list[_Pair]) -> list[dict[str, Any]]:
        """``batching: false``: each request is its own batch."""
        async with self._lock:
            return await self._run_batch(pairs)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _score_batched(self, pairs: list[_Pair]) -> list[dict[str, Any]]:
        return await self._coalescer.submit(pairs)

    async def score_items(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Rows for ``(prompt, response)`` items, batched with concurrent requests when enabled."""
        request = next(self._request_ids)
        self._stats.requests += 1
        pairs = [_Pair(p, r, request) for p, r in items]

        async def work() -> list[dict[str, Any]]:
            if self.settings.batching:
                return list(await asyncio.gather(*(self._score_batched(p) for p in pairs)))
            return await self._score_alone(pairs)

        return await run_with_timeout(work(), self.settings.request_timeout_s)

    # ------------------------------------------------------------------ HTTP

    def __serve_build_asgi_app__(self) -> FastAPI:
        s = self.settings
        evaluate_request, moderate_request = request_models(s.max_batch_items, s.max_chars)
        app = limited_app(
            "selfmoa evaluator",
            API_VERSION,
            "Safety, refusal and helpfulness scores from the selfmoa composite judge.",
            docs=s.docs,
            openapi=s.openapi,
            max_body_bytes=s.max_body_bytes,
        )
        auth = [Depends(self.auth.dependency())]

        @app.post(
            "/v1/evaluate",
            response_model=EvaluateResponse,
            dependencies=auth,
            responses=ERROR_RESPONSES,
            summary="Score a batch of (prompt, response) items",
        )
        async def evaluate(body: evaluate_request) -> dict[str, Any]:  # type: ignore[valid-type]
            items = body.items  # type: ignore[attr-defined]
            rows = await self.score_items([(it.prompt, it.response) for it in items])
            results = []
            for item, row in zip(items, rows, strict=True):
                if not body.details:  # type: ignore[attr-defined]
                    row = {**row, "evaluators": None}
                results.append({"id": item.id, **row})
            return {"results": results, "judge": self.judge_info}

        moderations_request = moderation.request_model(s.max_batch_items, s.max_chars)

        @app.post(
            "/v1/moderations",
            response_model=moderation.ModerationsResponse,
            dependencies=auth,
            responses=MODERATIONS_RESPONSES,
            summary="OpenAI's moderation API: each input judged as a model's response",
        )
        async def moderations(body: moderations_request) -> Any:  # type: ignore[valid-type]
            model = body.model  # type: ignore[attr-defined]
            if model is not None and model != self.moderation_model:
                return json_error(
                    404,
                    f"the model {quoted(model)} does not exist; this server's "
                    f"moderation model is {self.moderation_model!r}",
                    code="model_not_found",
                    param="model",
                )
            if not self.moderation.available:
                return json_error(
                    404,
                    f"the judge {self.judge_info.config!r} has no evaluator of safety (probe, "
                    "llama_guard, ...), so it cannot moderate text; use /v1/evaluate",
                    code="moderation_unavailable",
                )
            texts = body.input  # type: ignore[attr-defined]
            texts = [texts] if isinstance(texts, str) else texts
            rows = await self.score_items([("", text) for text in texts])
            results = [self.moderation.result(row) for row in rows]
            return moderation.response(self.moderation_model, results)

        @app.post(
            "/v1/moderate",
            response_model=ModerateResponse,
            dependencies=auth,
            responses=ERROR_RESPONSES,
            summary="Ours: moderate one prompt, one response, or a (prompt, response) pair",
        )
        async def moderate(body: moderate_request) -> dict[str, Any]:  # type: ignore[valid-type]
            prompt, response = body.prompt, body.response  # type: ignore[attr-defined]
            (row,) = await self.score_items([(prompt or "", response or "")])
            if response is not None:
                result = {"target": "response", **row}
            else:
                result = self._prompt_only(row)
            if not body.details:  # type: ignore[attr-defined]
                result["evaluators"] = None
            return {"result": result, "judge": self.judge_info}

        @app.get(
            "/v1/stats",
            response_model=StatsResponse,
            dependencies=auth,
            responses={401: ERROR_RESPONSES[401]},
            summary="This replica's request and batch counters",
        )
        async def stats() -> dict[str, Any]:
            st = self._stats
            return {
                "replica": self.replica,
                "replica_actor": self.replica_actor,
                "batching": s.batching,
                "max_batch_size": s.max_batch_size,
                "requests": st.requests,
                "items": st.items,
                "batches": st.batches,
                "max_batch_items": st.max_batch_items,
                "max_batch_requests": st.max_batch_requests,
                "mean_batch_items": st.items / st.batches if st.batches else 0.0,
                "uptime_s": time.monotonic() - st.started,
            }

        return app

    def _prompt_only(self, row: dict[str, Any]) -> dict[str, Any]:
        """A prompt alone: only evaluators that judge safety speak; refusal/helpfulness are moot."""
        judges = {e.name for e in self.judge_info.evaluators if "safety" in e.provides}
        safety = None if self.judge_info.safety_fallback else row["safety"]
        return {
            "target": "prompt",
            "safety": safety,
            "unsafe": None if safety is None else row["unsafe"],
            "refusal": None,
            "refusal_score": None,
            "helpfulness": None,
            "evaluators": {k: v for k, v in row["evaluators"].items() if k in judges},
        }

    def __del__(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- builder


def resolve_args(
    args: dict[str, Any] | EvaluatorAppArgs | None,
) -> tuple[EvaluatorAppArgs, JudgeSection]:
    """Validated app arguments and the judge section they select (ConfigError names bad keys)."""
    settings = (
        args if isinstance(args, EvaluatorAppArgs) else EvaluatorAppArgs.model_validate(args or {})
    )
    config = load_config(settings.judge_config, settings.overrides or None)
    return settings, config.judge


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application; ``serve run serve_apps.evaluator:build_app judge_config=tiny``.

    ``args`` are ``EvaluatorAppArgs``. The judge config is validated here, before anything is
    deployed, and the replicas receive the resolved judge section (no file access needed there).
    """
    settings, judge = resolve_args(args)
    deployment = EvaluatorDeployment
    if settings.deployment:
        deployment = deployment.options(**settings.deployment)
    return deployment.bind(settings.model_dump(exclude={"deployment"}), judge.model_dump())
