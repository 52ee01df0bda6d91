"""API keys: read from a file (one per line, '#' comments), kept in memory only as sha256 hashes.

Keys are sent as `Authorization: Bearer KEY` or `X-API-Key: KEY`. When keys are configured they
are required for predictions; admin endpoints always need one (and are disabled without keys).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from pathlib import Path

from starlette.requests import Request

from imagerec.serve.errors import ApiError
from imagerec.utils import ImageRecError

log = logging.getLogger("imagerec.serve")
MIN_KEY_LENGTH = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


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
        try:
            lines = Path(self.path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ImageRecError(f"cannot read API key file {self.path}: {e}") from e
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

    def check(self, key: str) -> bool:
        """Constant-time comparison against every accepted key (no early exit)."""
        digest = _digest(key)
        ok = False
        for h in self._hashes:
            ok |= hmac.compare_digest(digest, h)
        return ok


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


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
