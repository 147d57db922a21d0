"""API keys in front of any OpenAI-compatible Serve app: Ray Serve LLM's on GPUs.

Ray Serve LLM (``ray.serve.llm.build_openai_app``, our ``backend: vllm``) has no API-key option,
so on its own the policy would answer anyone who reaches Serve's port. ``gated(cls)`` turns the
ingress class of an app into one whose replicas put ``KeyGate`` in front of the app's own ASGI app:

* ``GET /healthz`` is answered by the gate, without a key (Ray's app has no health route);
* every other request needs a configured key (``auth.py``: ``Authorization: Bearer`` or
  ``X-API-Key``), else 401 in OpenAI's error shape (``errors.py``), before the app sees it;
* bodies over ``max_body_bytes`` get 413 before anything parses them (``limits.py``);
* the rest passes through untouched, streamed answers included.

It rides on Serve's ``__serve_build_asgi_app__`` hook (the replica asks the deployment for its
ASGI app after constructing it), so it needs no extra hop: the gated class *is* the ingress. It
works for any ``@serve.ingress`` class, whether its app is built up front (Ray's
``OpenAiIngress``, which ``make_fastapi_ingress`` wraps) or per replica (our ``PolicyDeployment``,
the stand-in the tests put behind it). Ray Serve LLM takes the gated ingress through its own
extension point, ``LLMServingArgs.ingress_cls_config``:

    build_openai_app({"llm_configs": [...], "ingress_cls_config": {
        "ingress_cls": "serve_apps.gate:GatedOpenAiIngress",
        "ingress_extra_kwargs": {"api_gate": {"allow_unauthenticated": False}}}})

which is what ``serve_apps.policy`` does for ``backend: vllm`` (``GatedOpenAiIngress`` is built on
first use, where ``ray.serve.llm`` imports: GPU nodes with vLLM). Keys are read by each ingress
replica from its environment, as the other apps read them; none configured = it refuses to start.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_apps.auth import APIKeyAuth, presented_key
from serve_apps.errors import error_body
from serve_apps.limits import BodySizeLimitMiddleware

logger = logging.getLogger("ray.serve")

HEALTH_PATH = "/healthz"


class GateArgs(BaseModel):
    """The gate's settings (``api_gate`` when the gated class is bound)."""

    model_config = ConfigDict(extra="forbid")

    api_keys_file: str | None = Field(
        None, description="secret file with one key per line, read by each replica"
    )
    allow_unauthenticated: bool = Field(
        False, description="serve without keys when none is configured (local development only)"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body size (413 above)")


class KeyGate:
    """ASGI middleware: ``/healthz`` without a key, everything else with one (401 otherwise)."""

    def __init__(self, app: ASGIApp, auth: APIKeyAuth, *, max_body_bytes: int):
        self.app = app
        self.auth = auth
        self._limited = BodySizeLimitMiddleware(app, max_body_bytes=max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (the app's startup) and websockets
            await self.app(scope, receive, send)
            return
        # Serve hands the app the path below its route prefix in root_path + path.
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path == HEALTH_PATH and scope["method"] in ("GET", "HEAD"):
            await _send(send, 200, {"status": "ok"})
            return
        refused = self.auth.refusal(presented_key(scope.get("headers", [])))
        if refused is not None:
            body = error_body(401, str(refused.detail), code=refused.code)
            await _send(send, 401, body, refused.headers)
            return
        await self._limited(scope, receive, send)

    def add_exception_handler(self, exc_class: Any, handler: Callable[..., Any]) -> None:
        """Serve registers its overload handlers on the replica's app: they belong to the app."""
        add = getattr(self.app, "add_exception_handler", None)
        if add is not None:
            add(exc_class, handler)


async def _send(
    send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def gate_auth(settings: GateArgs) -> APIKeyAuth:
    """The keys of this process's environment (and the file); ``AuthConfigError`` when none is
    configured and unauthenticated use was not allowed."""
    auth = APIKeyAuth.from_env(
        keys_file=settings.api_keys_file, allow_unauthenticated=settings.allow_unauthenticated
    )
    if not auth.enabled:
        logger.warning("gate: API-key auth is OFF (allow_unauthenticated); local use only")
    return auth


def gated(ingress_cls: type) -> type:
    """A subclass of ``ingress_cls`` whose replicas serve its ASGI app behind a ``KeyGate``.

    The subclass takes one more keyword argument, ``api_gate`` (``GateArgs`` as a dict). Keys are
    checked when the replica starts: none configured, and not ``allow_unauthenticated``, is a
    failed replica, as for the other apps.
    """

    class Gated(ingress_cls):  # type: ignore[misc, valid-type]
        async def __init__(self, *args: Any, api_gate: dict[str, Any] | None = None, **kwargs: Any):
            # Async: a class already wrapped by @serve.ingress has an async constructor.
            started = super().__init__(*args, **kwargs)
            if inspect.isawaitable(started):
                await started
            self._gate_settings = GateArgs.model_validate(api_gate or {})
            self._gate_auth = gate_auth(self._gate_settings)  # no key: the replica fails here

        def __serve_build_asgi_app__(self) -> KeyGate:
            build = getattr(super(), "__serve_build_asgi_app__", None)
            inner = build() if build is not None else self.app  # built per replica, or up front
            limit = self._gate_settings.max_body_bytes
            return KeyGate(inner, self._gate_auth, max_body_bytes=limit)

    Gated.__name__ = Gated.__qualname__ = f"Gated{ingress_cls.__name__}"
    Gated.__doc__ = f"{ingress_cls.__name__} behind an API-key gate (serve_apps/gate.py)."
    return Gated


def __getattr__(name: str) -> Any:
    """``GatedOpenAiIngress``: Ray's OpenAI ingress, gated; built on first use, as it imports only
    where vLLM does (``ray.serve.llm``'s import path ``serve_apps.gate:GatedOpenAiIngress``)."""
    if name != "GatedOpenAiIngress":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ray.serve.llm.ingress import OpenAiIngress

    cls = gated(OpenAiIngress)
    cls.__module__ = __name__
    globals()[name] = cls
    return cls
