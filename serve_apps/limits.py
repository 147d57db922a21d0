"""Request limits for the Serve apps' FastAPI ingress.

* ``BodySizeLimitMiddleware``: a pure ASGI middleware that answers 413 before any parsing when
  ``Content-Length`` is over the limit, and otherwise counts the body as it streams in (chunked
  uploads, or a lying ``Content-Length``) and stops reading at the limit.
* ``run_with_timeout``: bounds the work a request may take inside the replica; 504 when over.
* ``limited_app``: a FastAPI app with the above, OpenAI-shaped JSON errors (``errors.py``) and
  ``/healthz``, for each Serve app.

Errors a limit raises are ``HTTPException`` subclasses, so FastAPI passes them through its body
parsing unchanged (it turns any other exception raised while reading the body into a 400).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI
from pydantic import BeforeValidator, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_apps.errors import error_body, install_error_handlers

T = TypeVar("T")


def _integral_float_to_int(value: Any) -> Any:
    """4.0 -> 4: JSON Schema's ``integer`` admits integral numbers written with a fraction, so the
    published schema accepts them; strict validation still refuses "4", true and 4.5."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**bounds: int) -> Any:
    """An integer field of a strict request model, as JSON Schema reads "type: integer", with its
    bounds (``ge``, ``lt``...) published as ``minimum``/``exclusiveMaximum`` (they must come before
    the validator for pydantic to write them so)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral_float_to_int)]


# FastAPI answers 400 for a body it cannot decode (not UTF-8), the middleware for a bad
# Content-Length: every POST route can answer it.
UNREADABLE_BODY = "a body that cannot be read (not UTF-8, a bad Content-Length)"

# Serve itself sheds these before the app sees the request: its body is plain text, not
# ErrorResponse (Serve lets a deployment set the status and Retry-After, not the body).
OVERLOADED_DOC = {
    "description": "overloaded: the request was shed by Serve; retry after Retry-After seconds",
    "content": {"text/plain": {"schema": {"type": "string"}}},
    "headers": {
        "Retry-After": {
            "description": "seconds to wait before retrying (the deployment's "
            "backpressure_config.retry_after_s)",
            "schema": {"type": "integer"},
        }
    },
}


class PayloadTooLarge(HTTPException):
    """413 (code ``request_too_large``): the body is over the app's ``max_body_bytes``."""

    def __init__(self, message: str):
        super().__init__(status_code=413, detail=message)


class RequestTimeout(HTTPException):
    """504 (code ``timeout``): the work for this request took longer than the app's timeout."""

    def __init__(self, timeout_s: float):
        super().__init__(status_code=504, detail=f"request took longer than {timeout_s:g} s")
        self.timeout_s = timeout_s


async def run_with_timeout(awaitable: Awaitable[T], timeout_s: float | None) -> T:
    """Await ``awaitable``; cancel it and raise ``RequestTimeout`` (504) after ``timeout_s``."""
    if timeout_s is None or timeout_s <= 0:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, timeout=timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(timeout_s) from None


# --------------------------------------------------------------------------- body size


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class BodySizeLimitMiddleware:
    """413 for request bodies over ``max_body_bytes``, checked before anything parses them."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        if max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is larger than {self.max_body_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await _send_json(send, 400, error_body(400, "invalid Content-Length"))
                    return
                if declared > limit:
                    await _send_json(send, 413, error_body(413, self._too_large().detail))
                    return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._too_large()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge as err:
            # Normally the app's exception handler answers; this covers a body read outside it.
            if started:
                raise
            await _send_json(send, 413, error_body(413, err.detail))


def install_limits(app: FastAPI, *, max_body_bytes: int) -> None:
    """The body-size middleware and the OpenAI-shaped JSON error handlers."""
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=max_body_bytes)
    install_error_handlers(app)


def _document_400_not_422(app: FastAPI) -> None:
    """FastAPI lists a 422 for every route with a body; invalid requests are 400s here (as
    OpenAI's, ``errors.py``), which each route documents: the 422s and their schemas go."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def limited_app(
    title: str,
    version: str,
    summary: str,
    *,
    docs: bool,
    max_body_bytes: int,
    openapi: bool = True,
) -> FastAPI:
    """What every selfmoa app starts from: limits, JSON errors, ``/healthz``, the OpenAPI document
    unless ``openapi`` is false, and the Swagger UI (``/docs``, which needs the document) when
    ``docs`` is true."""
    app = FastAPI(
        title=title,
        version=version,
        summary=summary,
        docs_url="/docs" if docs and openapi else None,
        redoc_url=None,
        openapi_url="/openapi.json" if openapi else None,
    )
    install_limits(app, max_body_bytes=max_body_bytes)
    _document_400_not_422(app)

    @app.get("/healthz", summary="Liveness of this replica (no auth)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
