"""API keys: read from a file (one per line, '#' comments), kept in memory only as sha256 hashes.

Keys are sent as `Authorization: Bearer KEY` or `X-API-Key: KEY`. When keys are configured they
are required for predictions; admin endpoints always need one (and are disabled without keys).
The file is UTF-8 (a byte-order mark is ignored), and a key is compared as the bytes the client
sent: a non-ASCII key matches when sent as UTF-8, as curl and most clients send it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.requests import Request

from imagerec.serve.errors import ApiError
from imagerec.serve.settings import check_key_file
from imagerec.utils import ImageRecError

log = logging.getLogger("imagerec.serve")
MIN_KEY_LENGTH = 16


def _digest(key: str | bytes) -> bytes:
    """sha256 of a key's bytes: a key from the file as UTF-8, a key from a header as sent."""
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).digest()


class ApiKeys:
    """The accepted keys' hashes; `reload()` re-reads the file (e.g. after rotating a key)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._hashes: tuple[bytes, ...] = ()
        self._lock = threading.Lock()
        self.reload()

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def reload(self) -> int:
        if self.path is None:
            return 0
        check_key_file(self.path)  # a folder or a vanished file (a rotation gone wrong), said as such
        try:
            # utf-8-sig: a BOM (Windows editors write one) would otherwise become part of the first key.
            lines = Path(self.path).read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise ImageRecError(f"API key file {self.path} is not UTF-8 text (byte {e.start}): write one key "
                                "per line") from e
        except OSError as e:
            raise ImageRecError(f"cannot read API key file {self.path}: {e.strerror or e}") from e
        keys = [
            ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")
        ]
        short = [i for i, k in enumerate(keys) if len(k) < MIN_KEY_LENGTH]
        if short:
            raise ImageRecError(
                f"API key file {self.path}: keys must be at least {MIN_KEY_LENGTH} characters (key #{short[0] + 1} is shorter)"
            )
        if not keys:
            raise ImageRecError(
                f"API key file {self.path} holds no key (one per line); remove --api-key-file to run without keys"
            )
        with self._lock:
            self._hashes = tuple(dict.fromkeys(_digest(k) for k in keys))
        return len(self._hashes)

    def check(self, key: str | bytes) -> bool:
        """Constant-time comparison against every accepted key (no early exit); bytes as sent in a header."""
        digest = _digest(key)
        ok = False
        for h in self._hashes:
            ok |= hmac.compare_digest(digest, h)
        return ok


def presented_key(request: Request) -> bytes | None:
    """The key as the client sent its bytes. Starlette decodes header values as latin-1, which maps
    each byte to one character, so encoding back to latin-1 gives the raw bytes (UTF-8 for a
    non-ASCII key). Only spaces and tabs are trimmed: str.strip() would also eat the bytes 0x85 and
    0xa0 that end some UTF-8 characters."""
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.encode("latin-1").partition(b" ")
        if scheme.lower() == b"bearer" and value.strip(b" \t"):
            return value.strip(b" \t")
    key = request.headers.get("x-api-key", "").encode("latin-1").strip(b" \t")
    return key or None


# The two dependencies are `async def` on purpose: a plain `def` dependency runs in AnyIO's thread
# pool, a thread hand-off per request that took a quarter of the event loop's time under load.
async def require_predict_key(request: Request) -> None:
    """Dependency for prediction routes: a valid key when keys are configured (401 otherwise)."""
    keys: ApiKeys = request.app.state.keys
    if not keys.enabled:
        return
    key = presented_key(request)
    if key is None:
        raise ApiError(
            401,
            "unauthorized",
            "an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
            {"WWW-Authenticate": "Bearer"},
        )
    if not keys.check(key):
        raise ApiError(
            401,
            "unauthorized",
            "the API key is not valid",
            {"WWW-Authenticate": "Bearer"},
        )


async def require_admin_key(request: Request) -> None:
    """Dependency for admin routes: always a valid key; 403 when none is configured or none/a wrong one is sent."""
    keys: ApiKeys = request.app.state.keys
    if not keys.enabled:
        raise ApiError(
            403,
            "forbidden",
            "admin endpoints are disabled: the server was started without API keys (--api-key-file)",
        )
    key = presented_key(request)
    if key is None or not keys.check(key):
        raise ApiError(
            403,
            "forbidden",
            "admin endpoints need a valid API key ('Authorization: Bearer KEY' or 'X-API-Key: KEY')",
        )


SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
# OpenAPI `security` of an operation: predict needs a key only when the server has keys ({} = none);
# admin always does.
PREDICT_SECURITY = [{}, {"bearer": []}, {"apiKeyHeader": []}]
ADMIN_SECURITY = [{"bearer": []}, {"apiKeyHeader": []}]


def document_api_keys(app: FastAPI) -> None:
    """Add the two ways of sending a key to the app's OpenAPI document (components.securitySchemes)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
