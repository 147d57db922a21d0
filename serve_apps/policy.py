"""The policy Serve app: a chat model behind an OpenAI-compatible API.

Endpoints (FastAPI ingress; the OpenAPI document at ``/openapi.json``, ``/docs`` on request):

* ``POST /v1/chat/completions``: OpenAI's chat completions, with ``stream: true`` as server-sent
  events (``data: {chunk}`` lines, ending ``data: [DONE]``);
* ``GET /v1/models`` and ``GET /v1/models/{model}``: the one served model;
* ``GET /healthz``: liveness of the replica (no auth).

So any OpenAI client works against it: ``OpenAI(base_url="http://127.0.0.1:8000/policy/v1",
api_key=KEY)``. The model is a model spec (``packaged:smollm2-135m-instruct``, ``tiny-random``, a
Hugging Face folder) or a selfmoa run folder, whose final policy is served.

Two backends:

* ``hf`` (default; CPU or one GPU): one transformers model per replica. Generation runs in a
  worker thread, one request at a time per replica, so the event loop keeps accepting requests
  and answering health checks; streams come from ``AsyncTextIteratorStreamer``. API keys, size
  limits and OpenAI-shaped errors as in the evaluator app (``auth.py``, ``limits.py``,
  ``errors.py``): an invalid request is a 400 ``invalid_request_error``, as OpenAI's.
* ``vllm`` (GPU clusters): Ray Serve LLM's OpenAI app (``ray.serve.llm.build_openai_app``) on
  vLLM engines, configured by :func:`vllm_serving_args`, with our API-key gate as its ingress
  (``gate.py``: the same keys, 401s and body limit). Its other routes and errors are Ray's.

Run it: ``serve run serve_apps.policy:build_app model=tiny-random`` or, with the evaluator
beside it, ``serve run serve_apps/serve_config.yaml`` / ``selfmoa serve``.
"""

# No ``from __future__ import annotations`` here: FastAPI and Ray Serve read the annotations of the
# routes and of ``build_app`` at runtime, and the request models are built per deployment.

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic_core import PydanticCustomError
from ray import serve
from ray.serve import Application

from selfmoa_ray.engines.base import MIN_SAMPLING_TEMPERATURE, SamplingParams
from selfmoa_ray.schema import MANIFEST
from serve_apps.auth import APIKeyAuth
from serve_apps.errors import error_body, error_doc, json_error, quoted
from serve_apps.gate import GateArgs
from serve_apps.limits import (
    OVERLOADED_DOC,
    UNREADABLE_BODY,
    RequestTimeout,
    json_int,
    limited_app,
    run_with_timeout,
)

if TYPE_CHECKING:  # torch and transformers load in the replicas only, when the model does
    from transformers import StoppingCriteriaList

    from selfmoa_ray.engines.hf_core import Answer

logger = logging.getLogger("ray.serve")

API_VERSION = "1"
OWNER = "selfmoa"
# OpenAI's limit of 4 stop sequences, each at most this long: the stop checks scan a tail of this
# many characters per generated token, so the bound is what keeps them cheap.
MAX_STOPS, MAX_STOP_CHARS = 4, 256
MAX_NAME_CHARS = 256  # a `model` name; error messages quote at most ECHO_CHARS of it
# Seeds below 2**53: every such integer, and the bound, is exact in a JSON number that a client
# parses as a double, so clients and the schema agree on which seeds are valid (schemathesis
# found 2**63 + 190 taken for valid against a bound of 2**63).
SEED_LIMIT = 2**53


# --------------------------------------------------------------------------- app arguments


class PolicyAppArgs(BaseModel):
    """Arguments of ``build_app`` (``args:`` in the Serve config, or ``key=value`` on ``serve run``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(
        "packaged:smollm2-135m-instruct",
        description="model spec (packaged:NAME, tiny-random, a Hugging Face folder or hub id) or "
        "a selfmoa run folder (holds manifest.json), whose final policy is served",
    )
    served_model_name: str | None = Field(
        None, description="the `model` name clients use (default: derived from the model)"
    )
    backend: Literal["hf", "vllm"] = "hf"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    num_threads: int | None = Field(None, ge=1, description="torch threads per hf replica")
    # Sampling defaults, for requests that leave them out.
    max_tokens: int = Field(128, ge=1, description="completion tokens when the request says none")
    max_tokens_limit: int = Field(
        512, ge=1, description="most completion tokens a request may ask for (400 above)"
    )
    temperature: float = Field(1.0, ge=0, le=2, description="OpenAI's default; 0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    # Limits (400 when over, as OpenAI's; 413 for the body's size).
    max_messages: int = Field(64, ge=1, le=10_000, description="messages per request")
    max_chars: int = Field(16_000, ge=1, le=1_000_000, description="characters per message part")
    max_n: int = Field(4, ge=1, le=64, description="most choices per request (400 above)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body size (413 above)")
    request_timeout_s: float = Field(60.0, gt=0, description="wait + generation time (504)")
    # vLLM engine (backend: vllm only).
    max_model_len: int | None = Field(None, ge=64, description="vLLM context length")
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    accelerator_type: str | None = Field(None, description="e.g. H100, A10G (vLLM placement)")
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
    # Options for PolicyDeployment.options() (hf), or LLMConfig.deployment_config (vllm). In a
    # Serve config file, prefer the application's `deployments:` list (hf), which overrides these.
    deployment: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- model and run folders


class PolicySourceError(ValueError):
    """The ``model`` argument names no servable policy (e.g. a run without a final policy)."""


@dataclass(frozen=True)
class PolicySource:
    """What to load (``spec``: a folder or a model spec) and the name clients use."""

    spec: str
    served_name: str
    run_dir: str | None = None


def _name_of_spec(spec: str) -> str:
    """A readable model name for a model spec or a folder."""
    if spec.startswith("packaged:"):
        return spec.removeprefix("packaged:")
    if spec.startswith("tiny-random"):
        return spec.replace(":seed=", "-seed")
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path.resolve()
        # runs/demo/iter_02/policy -> iter_02-policy: "policy" alone says little.
        return f"{path.parent.name}-{path.name}" if path.name == "policy" else path.name
    return spec  # a hub id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct


def _final_policy(run_dir: Path, manifest: dict[str, Any]) -> str:
    """The folder (or, for a run whose baseline won, the model spec) of the run's final policy."""
    loop = manifest.get("loop") or {}
    final, final_path = loop.get("final_policy"), loop.get("final_policy_path")
    if not final_path:
        raise PolicySourceError(
            f"run folder {run_dir} has no final policy (its {MANIFEST} has no "
            "loop.final_policy_path): the run has not finished. Finish it with "
            "`selfmoa run --resume --output-dir ...`, or serve one of its iter_NN/policy folders"
        )
    path = Path(final_path)
    if not path.is_absolute():
        path = run_dir / path
    if path.is_dir():
        return str(path)
    moved = run_dir / str(final) / "policy"  # the run folder was moved or copied since
    if final and final != "baseline" and moved.is_dir():
        return str(moved)
    if final == "baseline":  # no iteration passed the checks: the starting model is the policy
        return str(final_path)
    raise PolicySourceError(
        f"run folder {run_dir}: its final policy {final!r} is not at {final_path} nor at {moved}"
    )


def resolve_policy(model: str, served_model_name: str | None = None) -> PolicySource:
    """Turn the ``model`` argument into something loadable, following run folders.

    A run folder (a folder with ``manifest.json``) serves ``manifest["loop"]["final_policy_path"]``
    under the run's name and the final policy's (``demo-iter_02``). Other specs are checked only as
    far as is cheap here (folders exist); the replicas resolve and load them.
    """
    model = str(model).strip()
    folder = Path(model).expanduser()
    if (folder / MANIFEST).is_file():
        run_dir = folder.resolve()
        try:
            manifest = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise PolicySourceError(f"cannot read {run_dir / MANIFEST}: {err}") from None
        spec = _final_policy(run_dir, manifest)
        run_name = ((manifest.get("config") or {}).get("run") or {}).get("name") or run_dir.name
        final = (manifest.get("loop") or {}).get("final_policy") or "policy"
        name = served_model_name or f"{run_name}-{final}"
        return PolicySource(spec=spec, served_name=name, run_dir=str(run_dir))
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise PolicySourceError(
                f"{model!r} is neither a Hugging Face model folder (no config.json) nor a "
                f"selfmoa run folder (no {MANIFEST})"
            )
        model = str(folder.resolve())
    elif model.startswith(("/", ".", "~")):
        raise PolicySourceError(f"model folder {model!r} does not exist")
    elif model.startswith("packaged:"):
        from selfmoa_ray.sources.models import PACKAGED_MODELS

        if model.removeprefix("packaged:") not in PACKAGED_MODELS:
            known = ", ".join(f"packaged:{n}" for n in sorted(PACKAGED_MODELS))
            raise PolicySourceError(f"unknown packaged model {model!r}; known: {known}")
    elif model == "tiny-random" or model.startswith("tiny-random:"):
        from selfmoa_ray.sources.models import tiny_seed

        try:
            tiny_seed(model, None)
        except ValueError as err:
            raise PolicySourceError(str(err)) from None
    return PolicySource(spec=model, served_name=served_model_name or _name_of_spec(model))


# --------------------------------------------------------------------------- API schemas


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = OWNER


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: error_doc(
        "an invalid request (invalid_request_error): malformed JSON, missing or wrong fields, a "
        "value over its limit (max_tokens, n, message count or length; code e.g. "
        "integer_above_max_value, param the field), prompt + max_tokens over the context "
        f"(context_length_exceeded), an unsupported feature (unsupported_parameter), or "
        f"{UNREADABLE_BODY}"
    ),
    401: error_doc("missing or invalid API key (code missing_api_key or invalid_api_key)"),
    404: error_doc("no such model (code model_not_found)"),
    413: error_doc("request body over max_body_bytes (code request_too_large)"),
    503: OVERLOADED_DOC,
    504: error_doc(
        "waiting for the model plus generation took longer than the app's timeout (code timeout)"
    ),
}


StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


@lru_cache(maxsize=8)
def request_model(
    max_messages: int, max_chars: int, max_tokens_limit: int, max_n: int
) -> type[BaseModel]:
    """The chat completion request, carrying this deployment's limits (shown in the OpenAPI too).

    Fields OpenAI clients send that do not change the answer here (``user``, ``store``,
    ``metadata``, penalties...) are accepted and ignored; a few that would change it are refused
    with 400 by :func:`_unsupported`. Invalid requests are 400s in OpenAI's shape (``errors.py``).
    """

    # Strict types throughout: "4" is not an integer and true is not a number (4.0 is 4, as in
    # JSON Schema).
    class Part(TextPart):
        model_config = ConfigDict(strict=True)
        text: str = Field(max_length=max_chars)

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        # "developer" is what newer OpenAI clients send for system instructions.
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[Part]

        @field_validator("content")
        @classmethod
        def _not_too_long(cls, content: str | list[Part]) -> str | list[Part]:
            # After the union is resolved, so that an over-long text is one size error (413).
            if isinstance(content, str) and len(content) > max_chars:
                raise PydanticCustomError(
                    "string_too_long",
                    "String should have at most {max_length} characters",
                    {"max_length": max_chars},
                )
            return content

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        include_usage: bool = False

    class ChatCompletionRequest(BaseModel):
        model_config = ConfigDict(
            extra="allow",
            strict=True,
            json_schema_extra={
                "examples": [
                    {
                        "model": "smollm2-135m-instruct",
                        "messages": [{"role": "user", "content": "How do I bake bread?"}],
                        "max_tokens": 64,
                        "temperature": 0.7,
                    }
                ],
                # Streams carry one choice (400 otherwise): said in the schema too.
                "if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
                "then": {"properties": {"n": {"const": 1}}},
            },
        )
        model: str | None = Field(
            None, max_length=MAX_NAME_CHARS, description="the served model's name (GET /v1/models)"
        )
        messages: list[Message] = Field(min_length=1, max_length=max_messages)
        max_tokens: json_int(ge=1, le=max_tokens_limit) | None = None
        max_completion_tokens: json_int(ge=1, le=max_tokens_limit) | None = None
        temperature: float | None = Field(
            None, ge=0, le=2, description=f"0 (or below {MIN_SAMPLING_TEMPERATURE}) = greedy"
        )
        top_p: float | None = Field(None, gt=0, le=1)
        n: json_int(ge=1, le=max_n) = 1
        seed: json_int(ge=0, lt=SEED_LIMIT) | None = Field(
            None, description="reproducible sampling"
        )
        stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = Field(
            None,
            description=f"up to {MAX_STOPS} stop sequences of 1 to {MAX_STOP_CHARS} characters",
        )
        stream: bool = False
        stream_options: StreamOptions | None = None

    return ChatCompletionRequest


def _unsupported(body: BaseModel) -> tuple[str, str, str] | None:
    """(message, param, code) when the request asks for something this server would silently
    get wrong, with OpenAI's codes for an unsupported parameter or value."""
    extra = body.model_extra or {}
    for name in ("tools", "functions"):
        if extra.get(name):
            message = "tools and function calling are not supported by this server"
            return message, name, "unsupported_parameter"
    if extra.get("logprobs"):
        return "logprobs are not supported by this server", "logprobs", "unsupported_value"
    response_format = extra.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
        message = "response_format other than text is not supported by this server"
        return message, "response_format", "unsupported_value"
    if body.stream and body.n > 1:
        return "stream supports n=1 only", "n", "unsupported_value"
    return None


def _stops(body: Any) -> list[str]:
    return body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []


def _text_of(content: str | list[Any]) -> str:
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


# --------------------------------------------------------------------------- generation


def _truncate_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop sequence (excluded, as OpenAI does), and whether one was hit."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class _StopFilter:
    """Streams text while holding back the last ``len(longest stop) - 1`` characters, the most a
    stop sequence could have begun in. Each piece costs time linear in its length plus that
    tail, never more: the buffer never grows beyond them."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buffer += text
        kept, hit = _truncate_at_stop(self.buffer, self.stops)
        if hit:
            self.buffer, self.stopped = "", True
            return kept
        keep = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:keep], self.buffer[keep:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


@dataclass
class _Job:
    """One request's generation, as the worker thread sees it."""

    input_ids: Any  # 1 x prompt_tokens tensor
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    seed: int | None
    stop: list[str]
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def sampling(self) -> SamplingParams:
        """The settings the generation core reads. Its ``seed`` is unused: a request seeds torch
        with ``seed`` itself, or not at all."""
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_tokens
        )


@dataclass
class _Sample:
    text: str
    tokens: int
    finish_reason: Literal["stop", "length"]


class HFGenerator:
    """The served transformers model: the generation core the batch engine runs on too
    (engines/hf_core.py: loading, templating, decoding keywords, answer cutting), plus what only a
    server needs: a tokenizer for the encode thread, stop sequences, cancellation, streaming.

    Not thread-safe: the deployment calls :meth:`complete` and :meth:`stream` from one worker
    thread, one job at a time (seeding torch's global RNG is only meaningful that way).
    """

    def __init__(self, spec: str, *, dtype: str, trust_remote_code: bool, num_threads: int | None):
        from selfmoa_ray.engines.hf_core import HFCore

        self.core = HFCore(
            spec, dtype=dtype, trust_remote_code=trust_remote_code, num_threads=num_threads
        )
        # Two tokenizers: a fast tokenizer must not be used by two threads at once, and the encode
        # thread templates new requests while the worker thread decodes (and streams) another one.
        self.tokenizer = self.core.tokenizer  # worker thread only
        self.prompt_tokenizer = self.core.new_tokenizer()  # the deployment's encode thread only
        self.eos_ids = self.core.eos_ids()
        self.context_length = getattr(self.core.model.config, "max_position_embeddings", None)

    def encode(self, messages: list[dict[str, str]]) -> Any:
        """Prompt token ids (1 x n) of a chat, with the assistant's answer opened after it."""
        return self.core.encode_chat(messages, self.prompt_tokenizer)

    def _stopping(self, job: _Job) -> "StoppingCriteriaList":
        from transformers import StoppingCriteria, StoppingCriteriaList

        tokenizer, start = self.tokenizer, job.prompt_tokens
        # A stop sequence of L characters ends within the last L tokens (+ a margin for tokens
        # that decode to nothing), so only that tail is decoded at each step.
        window = max((len(s) for s in job.stop), default=0) + 4

        class Stop(StoppingCriteria):
            """Ends a sequence at a stop sequence in its *generated* text (transformers' own
            ``stop_strings`` also matches across the prompt's end), and every sequence once the
            request is gone (timeout, client disconnect)."""

            def __call__(self, input_ids, scores, **kwargs):  # type: ignore[no-untyped-def]
                import torch

                if job.cancel.is_set():
                    return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                done = [
                    any(s in text for s in job.stop)
                    for text in tokenizer.batch_decode(
                        input_ids[:, max(start, input_ids.shape[1] - window) :],
                        skip_special_tokens=True,
                    )
                ] if job.stop else [False] * input_ids.shape[0]  # fmt: skip
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([Stop()])

    def _sample(self, answer: "Answer", job: _Job) -> _Sample:
        """An answer as the API reports it: cut at the request's first stop sequence, and finished
        ("stop") unless it used up ``max_tokens``."""
        text, hit = _truncate_at_stop(answer.text, job.stop)
        stopped = answer.eos or hit or answer.tokens < job.max_tokens
        return _Sample(text, answer.tokens, "stop" if stopped else "length")

    def complete(self, job: _Job) -> list[_Sample]:
        """``job.n`` samples (greedy: decoded once, repeated)."""
        from selfmoa_ray.engines.hf_core import rows_per_prompt, seed_torch

        seed_torch(job.seed)
        sampling = job.sampling
        rows = rows_per_prompt(sampling)
        new = self.core.generate(
            job.input_ids, None, sampling, rows=rows, stopping_criteria=self._stopping(job)
        )
        (answers,) = self.core.answers(new, n=job.n, rows=rows, eos_ids=self.eos_ids)
        return [self._sample(answer, job) for answer in answers]

    def stream(self, job: _Job, streamer: Any) -> _Sample:
        """Generate one sample into ``streamer``; the sample (for token counts) when done."""
        from selfmoa_ray.engines.hf_core import seed_torch

        seed_torch(job.seed)
        stopping = self._stopping(job)
        new = self.core.generate(
            job.input_ids, None, job.sampling, stopping_criteria=stopping, streamer=streamer
        )
        return self._sample(self.core.answer(new[0].tolist(), self.eos_ids), job)


# --------------------------------------------------------------------------- responses


def _event(data: dict[str, Any]) -> str:
    """One server-sent event, as OpenAI streams them."""
    return f"data: {json.dumps(data)}\n\n"


def _chunk(base: dict[str, Any], delta: dict[str, Any], finish: str | None, usage: bool) -> str:
    body = {**base, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip
    if usage:
        body["usage"] = None  # OpenAI sends null usage on every chunk but the last when asked
    return _event(body)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


# --------------------------------------------------------------------------- the deployment


@serve.deployment(
    # Defaults for code use; serve_apps/serve_config.yaml overrides them per cluster.
    max_ongoing_requests=4,
    max_queued_requests=8,
    # Shed requests get 503 with Retry-After (Serve writes the body, as plain text).
    backpressure_config={"retry_after_s": 5},
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class PolicyDeployment:
    """One chat model per replica behind the FastAPI app built in ``__serve_build_asgi_app__``."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = PolicyAppArgs.model_validate(settings)
        s = self.settings
        # Keys are read here, in the replica's own environment; none configured = refuse to start.
        self.auth = APIKeyAuth.from_env(
            keys_file=s.api_keys_file, allow_unauthenticated=s.allow_unauthenticated
        )
        if not self.auth.enabled:
            logger.warning("policy: API-key auth is OFF (allow_unauthenticated); local use only")
        self.served_name = s.served_model_name or _name_of_spec(s.model)
        self.generator = HFGenerator(
            s.model, dtype=s.dtype, trust_remote_code=s.trust_remote_code, num_threads=s.num_threads
        )
        self.created = int(time.time())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        # One thread: the prompt tokenizer must not be used by two threads at once.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ running jobs

    async def _start(self, fn: Callable[[], Any]) -> "asyncio.Future[Any]":
        """Wait for the model, then run ``fn`` in the worker thread; the model is freed when it ends.

        The lock is held until the thread finishes, even when the caller gives up (the job is then
        cancelled and stops at its next token), so generations never overlap.
        """
        await self._lock.acquire()
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except BaseException:
            self._lock.release()
            raise
        future.add_done_callback(lambda _: self._lock.release())
        return future

    async def _complete(self, job: _Job) -> list[_Sample]:
        future = await self._start(lambda: self.generator.complete(job))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            job.cancel.set()
            raise

    def _job(self, body: Any, input_ids: Any) -> _Job:
        s = self.settings
        return _Job(
            input_ids=input_ids,
            max_tokens=body.max_completion_tokens or body.max_tokens or s.max_tokens,
            temperature=s.temperature if body.temperature is None else body.temperature,
            top_p=s.top_p if body.top_p is None else body.top_p,
            n=body.n,
            seed=body.seed,
            stop=_stops(body),
        )

    async def _check(self, body: Any) -> JSONResponse | _Job:
        """The request's job, or the error response that refuses it. Templating and tokenising a
        long prompt take a while: they run in their own thread, off the event loop."""
        if body.model is not None and body.model != self.served_name:
            return json_error(
                404,
                f"the model {quoted(body.model)} does not exist; this server serves "
                f"{self.served_name!r}",
                code="model_not_found",
                param="model",
            )
        unsupported = _unsupported(body)
        if unsupported:
            message, param, code = unsupported
            return json_error(400, message, code=code, param=param)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
            for m in body.messages
        ]
        loop = asyncio.get_running_loop()
        try:
            input_ids = await loop.run_in_executor(self._encoder, self.generator.encode, messages)
        except Exception as err:  # jinja2's TemplateError, e.g. "roles must alternate"
            logger.info("chat template refused a request: %s", err)
            return json_error(400, "the model's chat template cannot format these messages",
                              code="invalid_messages", param="messages")  # fmt: skip
        job = self._job(body, input_ids)
        context = self.generator.context_length
        if context and job.prompt_tokens + job.max_tokens > context:
            return json_error(
                400,
                f"the prompt ({job.prompt_tokens} tokens) plus max_tokens ({job.max_tokens}) is "
                f"over the model's context of {context} tokens",
                code="context_length_exceeded",
                param="messages",
            )
        return job

    async def _stream(
        self, job: _Job, future: "asyncio.Future[_Sample]", streamer: Any, include_usage: bool,
        deadline: float,
    ) -> AsyncIterator[str]:  # fmt: skip
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.served_name, "system_fingerprint": None}  # fmt: skip
        loop = asyncio.get_running_loop()
        stops = _StopFilter(job.stop)
        try:
            yield _chunk(base, {"role": "assistant", "content": ""}, None, include_usage)
            async for text in _until(streamer, deadline - loop.time()):
                piece = stops.feed(text)
                if piece:
                    yield _chunk(base, {"content": piece}, None, include_usage)
                if stops.stopped:
                    job.cancel.set()  # the client has what it asked for
            sample = await future
            tail = stops.flush()
            if tail:
                yield _chunk(base, {"content": tail}, None, include_usage)
            finish = "stop" if stops.stopped else sample.finish_reason
            yield _chunk(base, {}, finish, include_usage)
            if include_usage:
                usage = _usage(job.prompt_tokens, sample.tokens)
                yield _event(
                    {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                )
        except RequestTimeout as err:  # the 200 is sent: the error goes in the stream, as OpenAI's
            yield _event(error_body(504, err.detail))
        except Exception:
            logger.exception("policy: streaming failed")
            yield _event(error_body(500, "The server had an error while processing your request."))
        finally:
            job.cancel.set()
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ HTTP

    def __serve_build_asgi_app__(self) -> FastAPI:
        s = self.settings
        chat_request = request_model(s.max_messages, s.max_chars, s.max_tokens_limit, s.max_n)
        app = limited_app(
            "selfmoa policy",
            API_VERSION,
            "An OpenAI-compatible chat completions API for the selfmoa policy model.",
            docs=s.docs,
            openapi=s.openapi,
            max_body_bytes=s.max_body_bytes,
        )
        auth = [Depends(self.auth.dependency())]

        @app.get("/v1/models", response_model=ModelList, dependencies=auth,
                 responses={401: ERROR_RESPONSES[401]}, summary="The served model")  # fmt: skip
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [self._card()]}

        @app.get("/v1/models/{model:path}", response_model=ModelCard, dependencies=auth,
                 responses={401: ERROR_RESPONSES[401], 404: ERROR_RESPONSES[404]},
                 summary="One model")  # fmt: skip
        async def model(model: str) -> Any:
            if model != self.served_name:
                return json_error(
                    404, f"the model {quoted(model)} does not exist", code="model_not_found"
                )
            return self._card()

        @app.post(
            "/v1/chat/completions",
            response_model=ChatCompletion,
            dependencies=auth,
            responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
            summary="Chat completion (OpenAI schema); stream=true answers server-sent events",
        )
        async def chat_completions(body: chat_request) -> Any:  # type: ignore[valid-type]
            checked = await self._check(body)
            if isinstance(checked, JSONResponse):
                return checked
            job = checked
            if body.stream:  # type: ignore[attr-defined]
                return await self._start_stream(job, body)
            samples = await run_with_timeout(self._complete(job), s.request_timeout_s)
            choices = [
                {"index": i, "message": {"role": "assistant", "content": x.text},
                 "finish_reason": x.finish_reason, "logprobs": None}
                for i, x in enumerate(samples)
            ]  # fmt: skip
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.served_name,
                "choices": choices,
                "usage": _usage(job.prompt_tokens, sum(x.tokens for x in samples)),
            }

        return app

    async def _start_stream(self, job: _Job, body: Any) -> StreamingResponse:
        """Wait for the model (504 when it stays busy), then stream while the thread generates."""
        from transformers import AsyncTextIteratorStreamer

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        streamer = AsyncTextIteratorStreamer(
            self.generator.tokenizer, skip_prompt=True, skip_special_tokens=True
        )

        def generate() -> _Sample:
            try:
                return self.generator.stream(job, streamer)
            except BaseException:
                streamer.end()  # the reader must not wait for tokens that will never come
                raise

        future = await run_with_timeout(self._start(generate), self.settings.request_timeout_s)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            self._stream(job, future, streamer, include_usage, deadline),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _card(self) -> dict[str, Any]:
        return {
            "id": self.served_name,
            "object": "model",
            "created": self.created,
            "owned_by": OWNER,
        }

    def __del__(self) -> None:
        for name in ("_executor", "_encoder"):
            executor = getattr(self, name, None)
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)


async def _until(streamer: Any, timeout_s: float) -> AsyncIterator[str]:
    """The streamer's text pieces; ``RequestTimeout`` once ``timeout_s`` has passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    iterator = streamer.__aiter__()
    while True:
        try:
            text = await asyncio.wait_for(iterator.__anext__(), max(deadline - loop.time(), 0))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise RequestTimeout(timeout_s) from None
        yield text


# --------------------------------------------------------------------------- vLLM (GPU)


# Ray Serve LLM deployment options for one vLLM engine replica: a GPU replica is expensive to
# start (~1 min), so keep one warm, scale out on queue depth, and shed beyond a bounded queue.
VLLM_DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
    "max_ongoing_requests": 64,
    "max_queued_requests": 128,
    "backpressure_config": {"retry_after_s": 5},
}


def vllm_llm_config(settings: PolicyAppArgs, model_path: str) -> dict[str, Any]:
    """``ray.serve.llm.LLMConfig`` arguments for serving ``model_path`` on vLLM (a plain dict).

    ``settings.served_model_name`` must be set (``build_app`` does it). ``settings.deployment``
    entries replace the defaults key by key (e.g. a whole ``autoscaling_config``).
    """
    if not settings.served_model_name:
        raise ValueError("served_model_name must be resolved before building the vLLM config")
    engine: dict[str, Any] = {
        "dtype": settings.dtype,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "trust_remote_code": settings.trust_remote_code,
    }
    if settings.max_model_len is not None:
        engine["max_model_len"] = settings.max_model_len
    config: dict[str, Any] = {
        "model_loading_config": {
            "model_id": settings.served_model_name,
            "model_source": model_path,
        },
        "engine_kwargs": engine,
        "deployment_config": {**VLLM_DEPLOYMENT_DEFAULTS, **settings.deployment},
        "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    }
    if settings.accelerator_type:
        config["accelerator_type"] = settings.accelerator_type
    return config


# Ray Serve LLM's ingress, with our API-key gate in front (serve_apps/gate.py).
GATED_INGRESS = "serve_apps.gate:GatedOpenAiIngress"


def vllm_serving_args(settings: PolicyAppArgs, model_path: str) -> dict[str, Any]:
    """``ray.serve.llm.build_openai_app``'s argument (``LLMServingArgs`` as a dict): the model's
    ``LLMConfig`` and, as the ingress, Ray's OpenAI ingress behind our API-key gate, configured
    from the app's ``api_keys_file``, ``allow_unauthenticated`` and ``max_body_bytes``."""
    gate = GateArgs(
        api_keys_file=settings.api_keys_file,
        allow_unauthenticated=settings.allow_unauthenticated,
        max_body_bytes=settings.max_body_bytes,
    )
    return {
        "llm_configs": [vllm_llm_config(settings, model_path)],
        "ingress_cls_config": {
            "ingress_cls": GATED_INGRESS,
            "ingress_extra_kwargs": {"api_gate": gate.model_dump()},
        },
    }


def _build_vllm_app(settings: PolicyAppArgs, source: PolicySource) -> Application:
    try:
        from ray.serve.llm import build_openai_app
    except ImportError as err:
        raise ImportError(
            "backend=vllm needs Ray Serve LLM with vLLM (GPU nodes: pip install "
            "'selfmoa-ray[gpu]'); on CPU use backend=hf"
        ) from err
    from selfmoa_ray.sources.models import resolve_model

    # vLLM loads a folder or a hub id; packaged/tiny specs are converted here, on this node, so
    # the folder must be on storage that the GPU nodes share (or use a folder/hub id directly).
    path = resolve_model(source.spec, trust_remote_code=settings.trust_remote_code).path
    return build_openai_app(vllm_serving_args(settings, path))


# --------------------------------------------------------------------------- builder


def resolve_args(args: dict[str, Any] | PolicyAppArgs | None) -> tuple[PolicyAppArgs, PolicySource]:
    """Validated app arguments (``model`` resolved, ``served_model_name`` filled) and the source."""
    settings = args if isinstance(args, PolicyAppArgs) else PolicyAppArgs.model_validate(args or {})
    source = resolve_policy(settings.model, settings.served_model_name)
    resolved = settings.model_copy(
        update={"model": source.spec, "served_model_name": source.served_name}
    )
    return resolved, source


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application; ``serve run serve_apps.policy:build_app model=tiny-random``.

    ``args`` are ``PolicyAppArgs``. A run folder is resolved to its final policy here, before
    anything is deployed (a run without one is an error now, not a failing replica later).
    """
    settings, source = resolve_args(args)
    if settings.backend == "vllm":
        return _build_vllm_app(settings, source)
    deployment = PolicyDeployment
    if settings.deployment:
        deployment = deployment.options(**settings.deployment)
    return deployment.bind(settings.model_dump(exclude={"deployment"}))
