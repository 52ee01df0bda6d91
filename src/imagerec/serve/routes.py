"""The HTTP endpoints. Async handlers only await: reading, decoding and inference run in the
decode pool and the batcher threads; admin handlers are plain `def` (FastAPI's thread pool)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from imagerec.serve.auth import PREDICT_SECURITY, require_predict_key
from imagerec.serve.batching import BatcherClosed, QueueFull
from imagerec.serve.entries import ModelEntry
from imagerec.serve.errors import ApiError, error_response, error_responses
from imagerec.serve.inputs import Prepared, Upload, parse_and_prepare_first, prepare_image

log = logging.getLogger("imagerec.serve")
router = APIRouter()
STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX_HTML = STATIC_DIR / "index.html"

# The request body is parsed by hand (streamed under a size cap, decoded in the pool), so the
# OpenAPI schema for it is written out here for /docs.
_PREDICT_BODY = {
    "security": PREDICT_SECURITY,
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "description": "one or more images (repeat the field; at most max_files, 16 by default)",
                        }
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "byte"},
                            "minItems": 1,
                            "description": "base64-encoded image files (at most max_files, 16 by default)",
                        },
                        "names": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "optional names echoed back",
                        },
                    },
                }
            },
        },
    },
}
_PREDICT_ERRORS = (400, 401, 408, 413, 415, 422, 503, 504)
_CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


# --- health, metrics, page -----------------------------------------------------------------------
# HEAD too: load balancers and uptime checkers often probe with it (the server sends no body).
@router.get("/healthz", tags=["ops"])
@router.head("/healthz", include_in_schema=False)
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"], responses=error_responses(503))
@router.head("/readyz", include_in_schema=False)
def readyz(request: Request) -> Response:
    """Models loaded and every batcher running."""
    registry = getattr(request.app.state, "registry", None)
    if registry is None or not registry.ready:
        return error_response(
            503,
            "not_ready",
            "models are not loaded yet (or a batcher stopped)",
            {"Retry-After": "1"},
        )
    default = registry.default()
    body: dict[str, Any] = {
        "status": "ready",
        "models": len(registry.entries()),
        "default": {"name": default.name, "version": default.version},
    }
    settings = request.app.state.settings
    if settings.worker_count > 1:  # which process answered: --workers
        body["worker"] = {"index": settings.worker_index, "of": settings.worker_count}
    return JSONResponse(body)


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
@router.head("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(
        INDEX_HTML,
        media_type="text/html",
        headers={"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff"},
    )


# --- models --------------------------------------------------------------------------------------
@router.get("/v1/models", tags=["models"])
def list_models(request: Request) -> dict[str, Any]:
    """Every loaded model version: classes, preprocessing, evaluation metrics, and which is the default."""
    registry = request.app.state.registry
    d = registry.default()
    return {
        "default": {"name": d.name, "version": d.version},
        "models": registry.cards(),
    }


@router.get("/v1/models/{name}/versions/{version}", tags=["models"], responses=error_responses(404, 422))
def model_card(request: Request, name: str, version: str) -> dict[str, Any]:
    registry = request.app.state.registry
    entry = registry.get(name, version)
    return entry.card(default=entry is registry.default())


# --- predictions ---------------------------------------------------------------------------------
@router.post(
    "/v1/predict",
    tags=["predict"],
    dependencies=[Depends(require_predict_key)],
    responses=error_responses(*_PREDICT_ERRORS),
    openapi_extra=_PREDICT_BODY,
)
async def predict(
    request: Request,
    top_k: int = Query(5, ge=1, description="labels to return per image"),
) -> JSONResponse:
    """Classify one or more images with the default model."""
    return await _predict(request, request.app.state.registry.default, top_k)


@router.post(
    "/v1/models/{name}/versions/{version}/predict",
    tags=["predict"],
    dependencies=[Depends(require_predict_key)],
    responses=error_responses(*_PREDICT_ERRORS, 404),
    openapi_extra=_PREDICT_BODY,
)
async def predict_version(
    request: Request, name: str, version: str, top_k: int = Query(5, ge=1)
) -> JSONResponse:
    """Classify with one given model version."""
    registry = request.app.state.registry
    return await _predict(request, functools.partial(registry.get, name, version), top_k)


async def _predict(request: Request, pick: Callable[[], ModelEntry], top_k: int) -> JSONResponse:
    """Predict with the model version `pick` returns, held until the answer (registry.holding): a
    reload or unload meanwhile lets this request finish on it, however long its body takes."""
    state, settings = request.app.state, request.app.state.settings
    with state.registry.holding(pick) as entry:
        if top_k > settings.max_top_k:
            raise ApiError(
                422,
                "invalid_parameter",
                f"top_k={top_k} is over the limit of {settings.max_top_k}",
            )
        return await _predict_held(request, entry, top_k)


async def _predict_held(request: Request, entry: ModelEntry, top_k: int) -> JSONResponse:
    state, settings = request.app.state, request.app.state.settings
    retry = {"Retry-After": str(settings.retry_after_s)}
    # Announced from the start of the body until the images are queued (serve.batching); closed
    # by _predict_steps once they are, or here on any way out.
    with contextlib.ExitStack() as announced:
        announced.enter_context(entry.batcher.incoming())
        body = await _read_body(request)
        # Only a request whose body has arrived takes prediction capacity: clients still
        # uploading (slowly, or stalled on purpose) are bounded by max_uploads instead.
        if state.inflight >= settings.max_inflight:
            raise ApiError(
                503,
                "overloaded",
                f"the server is handling {state.inflight} requests (limit max_inflight={settings.max_inflight}); retry later",
                retry,
            )
        state.inflight += 1
        state.metrics.inflight.set(state.inflight)
        steps = _predict_steps(request, entry, top_k, body, announced)
        del body  # held by the steps alone, which let it go once it is parsed
        try:
            return await asyncio.wait_for(steps, settings.timeout_s)
        except asyncio.TimeoutError as e:
            raise ApiError(
                504,
                "timeout",
                f"the prediction did not finish within {settings.timeout_s:g} s; retry later or send fewer images",
                retry,
            ) from e
        finally:
            state.inflight -= 1
            state.metrics.inflight.set(state.inflight)


async def _read_body(request: Request) -> bytes:
    """The whole request body, read in one of `max_uploads` upload slots within `body_timeout_s`
    (408 after that); 503 at once when every slot is taken."""
    state, settings = request.app.state, request.app.state.settings
    if state.uploads >= settings.max_uploads:
        raise ApiError(
            503,
            "too_many_uploads",
            f"{state.uploads} request bodies are being received (limit max_uploads={settings.max_uploads}); retry later",
            {"Retry-After": str(settings.retry_after_s)},
        )
    state.uploads += 1
    state.metrics.uploads.set(state.uploads)
    try:
        chunks = await asyncio.wait_for(
            _receive_chunks(request), settings.body_timeout_s
        )  # size-capped by BodyLimitMiddleware
    except asyncio.TimeoutError as e:
        raise ApiError(
            408,
            "request_timeout",
            f"the request body did not arrive within {settings.body_timeout_s:g} s",
            {"Connection": "close"},  # the rest of the body may still come: not worth reading
        ) from e
    finally:
        state.uploads -= 1
        state.metrics.uploads.set(state.uploads)
    return b"".join(chunks)


async def _receive_chunks(request: Request) -> list[bytes]:
    return [chunk async for chunk in request.stream()]


async def _decode(
    request: Request, entry: ModelEntry, body: bytes
) -> tuple[list[Upload], list[Prepared]]:
    """The request's uploads and their decoded, preprocessed images; 4xx ApiError for bad input."""
    settings = request.app.state.settings
    loop = asyncio.get_running_loop()
    pool = request.app.state.decode_pool
    if not body:
        raise ApiError(
            400,
            "empty_body",
            "the request body is empty: send multipart/form-data with field 'file', or JSON {\"images\": [...]}",
        )
    uploads, first = await loop.run_in_executor(
        pool, parse_and_prepare_first, entry.predictor, body,
        request.headers.get("content-type"), settings.max_files, settings.max_pixels,
    )
    results = await asyncio.gather(  # the other images of the request decode in parallel
        *(
            loop.run_in_executor(
                pool, prepare_image, entry.predictor, up, settings.max_pixels
            )
            for up in uploads[1:]
        ),
        return_exceptions=True,
    )
    for r in results:  # report the first bad image by index
        if isinstance(r, BaseException):
            raise r
    return uploads, [first, *results]  # type: ignore[list-item]


async def _predict_steps(
    request: Request, entry: ModelEntry, top_k: int, body: bytes, announced: contextlib.ExitStack
) -> JSONResponse:
    state, settings = request.app.state, request.app.state.settings
    retry = {"Retry-After": str(settings.retry_after_s)}
    with announced:  # ends the announcement once the images are queued (or on an error)
        uploads, prepared = await _decode(request, entry, body)
        del body
        try:
            futures = entry.batcher.submit_many([p.tensor for p in prepared])
        except QueueFull as e:
            raise ApiError(
                503, "queue_full", f"the inference queue is full ({e}); retry later", retry
            ) from e
        except BatcherClosed as e:
            raise ApiError(503, "model_unloading", f"{e}; retry", retry) from e
    wrapped = [asyncio.wrap_future(f) for f in futures]
    try:
        probs = await asyncio.gather(*wrapped)
    except asyncio.CancelledError:
        for f in futures:  # queued images of a cancelled (timed out) request are skipped by the batcher
            f.cancel()
        raise
    except BatcherClosed as e:
        raise ApiError(503, "model_unloading", f"{e}; retry", retry) from e

    bad = [up for up, row in zip(uploads, probs, strict=True) if not bool(torch.isfinite(row).all())]
    if bad:
        # The model's fault, not the image's: a NaN score is no prediction, and JSON has no NaN (the
        # response failed to render, a bare 500). Said once per request, recorded nowhere.
        message = (f"model {entry.name}@{entry.version} gave NaN or infinite scores for {len(bad)} of "
                   f"{len(uploads)} image(s) (first: {bad[0].label}): its weights hold NaN or "
                   "inf, or its precision overflowed; the server's operator must replace the model")
        log.error("%s", message)
        raise ApiError(500, "model_output_invalid", message)
    predictions = []
    for up, prep, row in zip(uploads, prepared, probs, strict=True):
        result = entry.predictor._result(up.name or up.label, row, top_k)
        result.pop("path", None)
        predictions.append(
            {
                "index": up.index,
                "name": up.name,
                **result,
                "sha256": prep.sha256,
                "format": prep.format,
                "width": prep.width,
                "height": prep.height,
            }
        )
    request_id = uuid.uuid4().hex
    if state.recorder.enabled:
        created = datetime.now(timezone.utc).isoformat()
        state.recorder.record(
            [
                {
                    "request_id": request_id,
                    "created_at": created,
                    "model": entry.name,
                    "version": entry.version,
                    "model_path": entry.source,  # resolved: what the store keys runs by
                    "sha256": p["sha256"],
                    "name": p["name"],
                    "label": p["label"],
                    "score": p["score"],
                    "topk": p["topk"],
                }
                for p in predictions
            ]
        )
    return JSONResponse(
        {
            "model": entry.name,
            "version": entry.version,
            "request_id": request_id,
            "predictions": predictions,
        },
        headers={"X-Model-Version": f"{entry.name}@{entry.version}"},
    )
