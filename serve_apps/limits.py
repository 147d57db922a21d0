"""Request limits and error responses for the Serve apps' FastAPI ingress.

* ``BodySizeLimitMiddleware``: a pure ASGI middleware that answers 413 before any parsing when
  ``Content-Length`` is over the limit, and otherwise counts the body as it streams in (chunked
  uploads, or a lying ``Content-Length``) and stops reading at the limit.
* ``install_error_handlers``: every error is JSON of one shape,
  ``{"error": {"type": ..., "message": ...}}``, never a stack trace. Validation errors list
  ``loc``/``msg``/``type`` only (never the input, which may be large or sensitive); unexpected
  exceptions are logged on the server and answered with a bare 500 ``internal_error``.
* ``run_with_timeout``: bounds the work a request may take inside the replica; 504 when over.
* ``limited_app``: a FastAPI app with all of the above and ``/healthz``, for each Serve app.

Errors a limit raises are ``HTTPException`` subclasses, so FastAPI passes them through its body
parsing unchanged (it turns any other exception raised while reading the body into a 400).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Iterable
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("ray.serve")

T = TypeVar("T")

ERROR_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "overloaded",
    504: "timeout",
}


def _integral_float_to_int(value: Any) -> Any:
    """4.0 -> 4: JSON Schema's ``integer`` admits integral numbers written with a fraction, so the
    published schema accepts them; strict validation still refuses "4", true and 4.5."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**bounds: int) -> Any:
    """An integer field of a strict request model, as JSON Schema reads "type: integer", with its
    bounds (``ge``, ``lt``...) published as ``minimum``/``exclusiveMaximum`` (they must come before
    the validator for pydantic to write them so)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral_float_to_int)]


# Pydantic error types that mean "too big" rather than "malformed": reported as 413.
SIZE_ERROR_TYPES = frozenset({"too_long", "string_too_long", "bytes_too_long"})


class ErrorDetail(BaseModel):
    type: str
    message: str
    code: str | None = None  # OpenAI's machine-readable code, where one applies
    param: str | None = None


class ErrorResponse(BaseModel):
    """Every error body of both apps (and what the OpenAPI documents)."""

    error: ErrorDetail


def error_doc(description: str) -> dict[str, Any]:
    """An OpenAPI ``responses`` entry for an error status."""
    return {"model": ErrorResponse, "description": description}


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


def error_body(error_type: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message, **extra}}


def json_error(
    status_code: int,
    message: str,
    *,
    error_type: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    error_type = error_type or ERROR_TYPES.get(status_code, "error")
    return JSONResponse(
        error_body(error_type, message, **extra), status_code=status_code, headers=headers
    )


class PayloadTooLarge(HTTPException):
    """413; ``limit`` is reported to the client."""

    def __init__(self, message: str, *, limit: int | None = None):
        super().__init__(status_code=413, detail=message)
        self.limit = limit


class RequestTimeout(HTTPException):
    """504: the work for this request took longer than the app's timeout."""

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
        return PayloadTooLarge(
            f"request body is larger than {self.max_body_bytes} bytes", limit=self.max_body_bytes
        )

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
                    await _send_json(send, 400, error_body("bad_request", "invalid Content-Length"))
                    return
                if declared > limit:
                    err = self._too_large()
                    body = error_body("payload_too_large", err.detail, limit=limit)
                    await _send_json(send, 413, body)
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
            await _send_json(send, 413, error_body("payload_too_large", err.detail, limit=limit))


# --------------------------------------------------------------------------- error handlers


def _clean_errors(errors: Iterable[Any]) -> list[dict[str, Any]]:
    """Validation errors without the offending input (it may be large or hold secrets)."""
    out = []
    for e in errors:
        item = {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                "type": str(e.get("type", ""))}  # fmt: skip
        out.append(item)
    return out


def _is_size_error(error: dict[str, Any]) -> bool:
    return error["type"] in SIZE_ERROR_TYPES


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    extra: dict[str, Any] = {}
    if isinstance(exc, PayloadTooLarge) and exc.limit is not None:
        extra["limit"] = exc.limit
    if isinstance(code := getattr(exc, "code", None), str):  # e.g. auth.Unauthorized
        extra["code"] = code
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    return json_error(exc.status_code, message, headers=exc.headers, **extra)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _clean_errors(exc.errors())
    if errors and all(_is_size_error(e) for e in errors):
        return json_error(413, "request is over a size limit", errors=errors)
    return json_error(422, "request is not valid", errors=errors)


async def _internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Logged here with its traceback; the client only learns that something failed.
    logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return json_error(500, "internal error")


def install_error_handlers(app: FastAPI) -> None:
    """JSON errors of one shape for every failure, with no stack traces."""
    app.add_exception_handler(HTTPException, _http_exception_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(Exception, _internal_error_handler)


def install_limits(app: FastAPI, *, max_body_bytes: int) -> None:
    """The body-size middleware and the JSON error handlers."""
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=max_body_bytes)
    install_error_handlers(app)


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

    @app.get("/healthz", summary="Liveness of this replica (no auth)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
