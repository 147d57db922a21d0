"""API-key authentication for the Serve apps.

Keys come from the environment of the process that serves requests (the Serve replica):

* ``SELFMOA_API_KEYS``: comma-separated keys;
* ``SELFMOA_API_KEYS_FILE``: path to a secret file with one key per line (blank lines and lines
  starting with ``#`` are skipped), e.g. a mounted Kubernetes secret.

A key is 16 to 512 characters of ``A-Z a-z 0-9 - _ . ~ + / =`` (base64, base64url or hex, e.g.
``python -c 'import secrets; print(secrets.token_urlsafe(32))'``). A file with any other line is
refused whole, by line number and never by content: pointed by mistake at a password or
configuration file, the server does not start with its lines as keys.

Both may be set; the union is accepted, so keys can be rotated by adding the new key, moving
clients over, then removing the old one. Clients send ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``. Every presented key is hashed and compared with every configured key with
``hmac.compare_digest`` (no early exit, no length leak). A failure is a 401 in OpenAI's error shape
(``type: invalid_request_error``, as the OpenAI API answers a bad key; ``code: missing_api_key`` or
``invalid_api_key``) with a ``WWW-Authenticate`` header; the presented key is never logged or
echoed. ``APIKeyAuth.dependency()`` enforces keys on FastAPI routes; ``APIKeyAuth.refusal()`` with
``presented_key()`` does the same for any ASGI app (``gate.py``).

With no key configured the app refuses to start, unless ``allow_unauthenticated=True`` is passed
explicitly (local development only).
"""

# No ``from __future__ import annotations``: FastAPI reads the dependency's annotations at runtime,
# and they refer to local security schemes.

import hashlib
import hmac
import os
import re
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

from fastapi import HTTPException, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

ENV_KEYS = "SELFMOA_API_KEYS"
ENV_KEYS_FILE = "SELFMOA_API_KEYS_FILE"
API_KEY_HEADER = "X-API-Key"
MIN_KEY_LENGTH, MAX_KEY_LENGTH = 16, 512
KEY_CHARS = "A-Z a-z 0-9 - _ . ~ + / ="
KEY_PATTERN = re.compile(r"[A-Za-z0-9_\-.~+/=]+")
MAKE_A_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
REALM = "selfmoa"
MISSING_KEY_MESSAGE = (
    f"an API key is required: send 'Authorization: Bearer <key>' or '{API_KEY_HEADER}: <key>'"
)


class AuthConfigError(RuntimeError):
    """API keys cannot be loaded, or none is configured and unauthenticated use was not allowed."""


class Unauthorized(HTTPException):
    """401 with a machine-readable ``code`` (OpenAI's ``invalid_api_key``, or ``missing_api_key``)."""

    def __init__(self, message: str, code: str):
        super().__init__(401, message, headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'})
        self.code = code


def _check_key(key: str, origin: str) -> str:
    """``key`` if it has the documented format; the error names ``origin``, never the key."""
    if len(key) < MIN_KEY_LENGTH:
        raise AuthConfigError(
            f"an API key from {origin} is shorter than {MIN_KEY_LENGTH} characters; "
            f"use a long random key (e.g. `{MAKE_A_KEY}`)"
        )
    if len(key) > MAX_KEY_LENGTH or not KEY_PATTERN.fullmatch(key):
        raise AuthConfigError(
            f"{origin} is not an API key: a key is {MIN_KEY_LENGTH} to {MAX_KEY_LENGTH} of the "
            f"characters {KEY_CHARS} (e.g. `{MAKE_A_KEY}`)"
        )
    return key


def read_keys_file(path: str | Path) -> list[str]:
    """Keys from a secret file, one per line; the error names the file, never its content."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AuthConfigError(
            f"cannot read the API key file {path}: {type(err).__name__}"
        ) from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(_check_key(line, f"line {number} of {path}"))
    return keys


def load_api_keys(
    environ: Mapping[str, str] | None = None, *, keys_file: str | Path | None = None
) -> list[str]:
    """Keys from ``SELFMOA_API_KEYS``, from the file in ``SELFMOA_API_KEYS_FILE`` and ``keys_file``."""
    env = os.environ if environ is None else environ
    keys = [_check_key(k.strip(), ENV_KEYS) for k in env.get(ENV_KEYS, "").split(",") if k.strip()]
    for path in (env.get(ENV_KEYS_FILE, "").strip() or None, keys_file):
        if path:
            file_keys = read_keys_file(path)
            if not file_keys:
                raise AuthConfigError(f"the API key file {path} holds no key")
            keys.extend(file_keys)
    return list(dict.fromkeys(keys))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class APIKeyAuth:
    """Checks API keys; ``dependency()`` gives the FastAPI dependency that enforces them."""

    def __init__(self, keys: Iterable[str], *, allow_unauthenticated: bool = False):
        self._digests = [_digest(k) for k in keys]
        if not self._digests and not allow_unauthenticated:
            raise AuthConfigError(
                f"no API key configured: set {ENV_KEYS} (comma-separated keys) or "
                f"{ENV_KEYS_FILE} (a file with one key per line) in the environment of the "
                "serving processes, or pass allow_unauthenticated=True for local development only"
            )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        keys_file: str | Path | None = None,
        allow_unauthenticated: bool = False,
    ) -> "APIKeyAuth":
        keys = load_api_keys(environ, keys_file=keys_file)
        return cls(keys, allow_unauthenticated=allow_unauthenticated)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    @property
    def num_keys(self) -> int:
        return len(self._digests)

    def check(self, presented: str | None) -> bool:
        """True when ``presented`` is a configured key (always True with auth disabled)."""
        if not self._digests:
            return True
        if not presented:
            return False
        digest = _digest(presented)
        ok = False
        for expected in self._digests:  # every key is compared: no early exit
            ok |= hmac.compare_digest(digest, expected)
        return ok

    def refusal(self, presented: str | None) -> Unauthorized | None:
        """The 401 to answer a request that presented ``presented`` (None: let it through)."""
        if not self.enabled:
            return None
        if not presented:
            return Unauthorized(MISSING_KEY_MESSAGE, "missing_api_key")
        if not self.check(presented):
            return Unauthorized("Incorrect API key provided.", "invalid_api_key")
        return None

    def dependency(self) -> Callable[..., Coroutine[Any, Any, None]]:
        """A FastAPI dependency: ``dependencies=[Depends(auth.dependency())]``.

        The two security schemes also put an "Authorize" button on the OpenAPI page.
        """
        bearer = HTTPBearer(
            auto_error=False, description="`Authorization: Bearer <key>`", scheme_name="bearer"
        )
        header = APIKeyHeader(
            name=API_KEY_HEADER,
            auto_error=False,
            description=f"`{API_KEY_HEADER}: <key>`",
            scheme_name="apiKey",
        )

        async def require_api_key(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
            api_key: Annotated[str | None, Security(header)],
        ) -> None:
            presented = credentials.credentials if credentials is not None else api_key
            refused = self.refusal(presented)
            if refused is not None:
                raise refused

        return require_api_key


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key an ASGI request presents (raw headers): ``Authorization: Bearer <key>`` first, as
    the FastAPI dependency reads it, else ``X-API-Key``."""
    bearer = api_key = None
    for name, value in headers:
        name = name.lower()
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif name == API_KEY_HEADER.lower().encode():
            api_key = value.decode("latin-1").strip() or None
    return bearer or api_key
