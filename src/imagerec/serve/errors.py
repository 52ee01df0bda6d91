"""One JSON error shape for every failure: {"error": {"type": ..., "message": ...}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("imagerec.serve")

_HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An error answered to the client as-is: HTTP status, a short machine type, a message for humans."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = (
            status,
            type,
            message,
            headers or {},
        )
        self.extra = extra or {}  # more fields of the error object (e.g. what a reload did do)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # some errors say more (e.g. what a reload did do)
    type: str
    message: str


class ErrorBody(BaseModel):
    """Every error the server answers: {"error": {"type": ..., "message": ...}}."""

    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "bad request (no images, a malformed body or path)",
    401: "API key missing or not valid",
    403: "admin key missing or not valid (or the server has no keys)",
    404: "no such model, version or path",
    408: "the body did not arrive in time",
    409: "that name@version is already loaded (load), or is the default (unload)",
    413: "body, file count (at most max_files, 16 by default) or pixel count over the limit",
    415: "not an image of a format the server reads (checked by magic bytes)",
    422: "invalid parameter, undecodable image, or a model that failed to load",
    503: "overloaded or not ready (see Retry-After)",
    504: "decoding and inference timed out",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for these error statuses, each with the JSON error shape (declaring 422
    also replaces FastAPI's own validation-error schema, which this server never answers)."""
    return {status: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


def error_body(type: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": type, "message": message, **extra}}


def error_response(
    status: int, type: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(error_body(type, message, **extra), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, on_error: Any = None) -> None:
    """Map ApiError, HTTP errors, validation errors and genuine bugs onto the JSON error shape.
    `on_error(type)` is called for every error answered (for the errors-by-type metric)."""

    def note(type: str) -> None:
        if on_error is not None:
            on_error(type)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        note(e.type)
        return error_response(e.status, e.type, e.message, e.headers, **e.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        type = _HTTP_TYPES.get(e.status_code, "http_error")
        note(type)
        message = str(e.detail)
        if e.status_code == 404:
            message = (
                f"no such endpoint: {request.method} {request.url.path} (see /docs)"
            )
        elif e.status_code == 405:
            message = (
                f"method {request.method} not allowed on {request.url.path} (see /docs)"
            )
        return error_response(e.status_code, type, message, dict(e.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        note("invalid_parameter")
        return error_response(
            422, "invalid_parameter", "; ".join(parts) or "invalid request"
        )

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        # The client closed the connection before its body arrived (a load generator stopping, a
        # browser tab closed): nobody is there to answer, and it is not a server bug. Without this
        # handler it was logged as "internal error" with two tracebacks and counted as a 500.
        log.info("client disconnected during %s %s", request.method, request.url.path)
        note("client_disconnected")
        return error_response(499, "client_disconnected", "the client closed the connection")

    @app.exception_handler(Exception)
    async def _server_bug(request: Request, e: Exception) -> JSONResponse:
        # Only genuine server bugs land here: client input errors are ApiErrors by construction.
        log.exception("internal error on %s %s", request.method, request.url.path)
        note("internal_error")
        return error_response(
            500, "internal_error", "internal server error (logged); please report it"
        )
