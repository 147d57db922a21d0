"""Error answers of both Serve apps, in OpenAI's error shape.

Every error either app sends is ``{"error": {"message", "type", "param", "code"}}``, as the OpenAI
API answers, so OpenAI clients raise the exception they expect (``openai.BadRequestError`` for a
400, ``AuthenticationError`` for a 401, ...) and read ``code`` and ``param`` from it:

* ``type`` is ``invalid_request_error`` for every 4xx (the OpenAI API's type for a bad key too) and
  ``server_error`` for every 5xx;
* ``param`` names the request field at fault in OpenAI's notation (``messages[0].content``), or
  is null;
* ``code`` is OpenAI's machine-readable code where one applies (``missing_required_parameter``,
  ``integer_above_max_value``, ``string_above_max_length``, ``invalid_api_key``,
  ``model_not_found``...), or null.

Invalid requests (malformed JSON, wrong or missing fields, values over a limit) are 400, never
422: pydantic's validation errors are translated here. Messages never quote the request's values
(they may be large or secret), only the names of its fields, cut at ``ECHO_CHARS``. No answer
carries a stack trace: unexpected exceptions are logged on the server and answered with a bare 500.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

logger = logging.getLogger("ray.serve")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
ECHO_CHARS = 64  # the most of a client-chosen name (a field, a path) an error message quotes

# Codes for the statuses whose cause is always the same.
STATUS_CODES = {413: "request_too_large", 504: "timeout"}

# pydantic type errors (OpenAI code invalid_type) -> what the field should have been.
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "string_type": "a string",
    "bool_type": "a boolean", "bool_parsing": "a boolean", "list_type": "an array",
    "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
}  # fmt: skip
# Union members appear in pydantic's error locations by name ("str", "list[Part]",
# "constrained-str", "function-before[...]"): not fields.
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "bytes", "none", "list", "dict"})
# pydantic size error type -> (what, over the maximum?)
_SIZES = {
    "string_too_long": ("string", True), "string_too_short": ("string", False),
    "too_long": ("array", True), "too_short": ("array", False),
}  # fmt: skip


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx)")
    param: str | None = Field(description="the request field at fault, e.g. messages[0].content")
    code: str | None = Field(description="machine-readable cause, e.g. integer_above_max_value")


class ErrorResponse(BaseModel):
    """Every error body of both apps (and what their OpenAPI documents list)."""

    error: ErrorDetail


def error_doc(description: str) -> dict[str, Any]:
    """An OpenAPI ``responses`` entry for an error status."""
    return {"model": ErrorResponse, "description": description}


def error_type(status: int) -> str:
    return INVALID_REQUEST if status < 500 else SERVER_ERROR


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    code = code if code is not None else STATUS_CODES.get(status)
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def json_error(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(status, message, code=code, param=param)
    return JSONResponse(body, status_code=status, headers=headers)


def echo(name: str) -> str:
    """A client-chosen name as a message may quote it: cut at ``ECHO_CHARS``."""
    return name if len(name) <= ECHO_CHARS else name[:ECHO_CHARS] + "..."


def quoted(value: str) -> str:
    """A client-chosen value (a ``model``) as a message may quote it: repr'd, and cut."""
    return repr(echo(value))


# --------------------------------------------------------------------------- validation errors


def _is_field(part: Any) -> bool:
    return isinstance(part, int) or (
        isinstance(part, str) and part.isidentifier() and part not in _TYPE_NAMES
    )


def param_of(loc: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"`` (OpenAI's notation)."""
    parts = [p for p in loc[1:] if _is_field(p)] if loc and loc[0] == "body" else []
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return echo(out) if out else None


def _bound(ctx: dict[str, Any], value: Any) -> tuple[str, str]:
    """("integer"|"decimal", "<= 32"): OpenAI names integer and decimal bounds apart."""
    op, limit = next((k, v) for k, v in ctx.items() if k in ("le", "lt", "ge", "gt"))
    integers = all(isinstance(n, int) and not isinstance(n, bool) for n in (limit, value))
    kind = "integer" if integers else "decimal"
    sign = {"le": "<=", "lt": "<", "ge": ">=", "gt": ">"}[op]
    return kind, f"{sign} {limit}"


def describe_error(error: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(message, param, code) for one pydantic error, worded as the OpenAI API words its own."""
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    loc = error.get("loc", ())
    param = param_of(loc)
    where = f"'{param}'" if param else "the request body"
    msg = str(error.get("msg", "invalid")).removeprefix("Value error, ").rstrip(".")
    if kind == "json_invalid":
        position = f" at position {loc[1]}" if len(loc) > 1 else ""
        return (
            f"The request body is not valid JSON ({ctx.get('error', msg)}{position}).",
            None,
            None,
        )
    if kind == "missing":
        return f"Missing required parameter: {where}.", param, "missing_required_parameter"
    if kind == "extra_forbidden":
        return f"Unknown parameter: {where}.", param, "unknown_parameter"
    if kind in _EXPECTED:
        return f"Invalid type for {where}: expected {_EXPECTED[kind]}.", param, "invalid_type"
    if kind in _SIZES:
        what, more = _SIZES[kind]
        limit = ctx.get("max_length" if more else "min_length")
        if what == "array" and not more and ctx.get("actual_length") == 0:
            text = f"Invalid {where}: empty array. Expected an array with minimum length {limit}."
            return text, param, "empty_array"
        size, side = ("maximum", "above_max") if more else ("minimum", "below_min")
        text = (
            f"Invalid {where}: {what} too {'long' if more else 'short'}. "
            f"Expected {'an' if what == 'array' else 'a'} {what} with {size} length {limit}."
        )
        return text, param, f"{what}_{side}_length"
    if kind in ("less_than_equal", "less_than", "greater_than_equal", "greater_than") and ctx:
        number, bound = _bound(ctx, error.get("input"))
        above = kind.startswith("less")
        side = f"{'above maximum' if above else 'below minimum'} value"
        code = f"{number}_{'above_max' if above else 'below_min'}_value"
        return f"Invalid {where}: {number} {side}. Expected a value {bound}.", param, code
    return f"Invalid value for {where}: {msg}.", param, "invalid_value"


def _within(param: str | None, outer: str | None) -> bool:
    """``messages[0].content`` is within ``messages`` (a union's members report both)."""
    if param is None or outer is None:
        return param == outer
    return param == outer or (param.startswith(outer) and param[len(outer)] in "[.")


def validation_error_body(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One 400 body for a request's validation errors, as OpenAI reports one, with the other
    fields at fault named. A union's members each report an error (``"stop"``: not a string, nor
    a list of short strings): the most specific one is reported, the deepest field's, preferring
    a wrong value to a wrong type; wrong types of one field are merged ("a string or an array")."""
    if not errors:
        return error_body(400, "The request is not valid.")

    def rank(i: int) -> tuple[int, bool, int]:
        error = errors[i]
        depth = len([p for p in error.get("loc", ()) if _is_field(p)])
        return depth, error.get("type") not in _EXPECTED, -i

    chosen = errors[max(range(len(errors)), key=rank)]
    message, param, code = describe_error(chosen)
    if code == "invalid_type":
        wanted = dict.fromkeys(
            _EXPECTED[e["type"]]
            for e in errors
            if e.get("type") in _EXPECTED and describe_error(e)[1] == param
        )
        message = f"{message.rsplit(': expected ', 1)[0]}: expected {' or '.join(wanted)}."
    params = dict.fromkeys(describe_error(e)[1] for e in errors)
    others = [p for p in params if not _within(param, p)]
    if others:
        names = ", ".join(f"'{p}'" if p else "the request body" for p in others[:5])
        message += f" Also invalid: {names}{', ...' if len(others) > 5 else ''}."
    return error_body(400, message, code=code, param=param)


# --------------------------------------------------------------------------- handlers


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    code = getattr(exc, "code", None)  # e.g. auth.Unauthorized's invalid_api_key
    where = f"({request.method} {echo(request.url.path)})"
    if exc.status_code == 404 and message == "Not Found":  # Starlette's: no such route
        message = f"Invalid URL {where}."
    elif exc.status_code == 405 and message == "Method Not Allowed":
        message = f"Method not allowed {where}."
    return json_error(
        exc.status_code, message, code=code if isinstance(code, str) else None, headers=exc.headers
    )


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(validation_error_body(exc.errors()), status_code=400)


async def _internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Logged here with its traceback; the client only learns that something failed.
    logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return json_error(500, "The server had an error while processing your request.")


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped JSON errors for every failure, with no stack traces."""
    app.add_exception_handler(HTTPException, _http_exception_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(Exception, _internal_error_handler)
