"""The FastAPI app and `serve()`: models load in the lifespan, inference runs in batcher threads."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import fastapi_offline
import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp

from imagerec import __version__
from imagerec.serve.admin import admin_actions
from imagerec.serve.admin import router as admin_router
from imagerec.serve.auth import ApiKeys, document_api_keys
from imagerec.serve.errors import error_response, install_error_handlers
from imagerec.serve.http import MAX_HEAD_BYTES, http_protocol
from imagerec.serve.limits import BodyLimitMiddleware
from imagerec.serve.metrics import MetricsMiddleware, ServeMetrics, route_templates
from imagerec.serve.recording import Recorder
from imagerec.serve.registry import ModelRegistry
from imagerec.serve.routes import STATIC_DIR, router
from imagerec.serve.settings import ServeSettings, create_settings
from imagerec.serve.workers import Admin, AdminLog, check_picklable, run_workers
from imagerec.utils import ImageRecError, available_cpus

log = logging.getLogger("imagerec.serve")
# Swagger UI's script and styles as a package ships them (fastapi-offline), so /docs works on a
# machine with no internet, like the page at /; FastAPI's own /docs loads them from a CDN.
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"


def _add_docs(app: FastAPI) -> None:
    app.mount("/docs-static", StaticFiles(directory=DOCS_ASSETS), name="docs-static")

    @app.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} API",
            swagger_js_url=f"{root}/docs-static/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs-static/swagger-ui.css",
            swagger_favicon_url=f"{root}/static/favicon.svg",
        )


class JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, but a refused preflight gets the server's JSON error shape (400
    `cors_rejected`, saying what was refused and what is allowed) and is counted by `on_error`,
    instead of a text/plain "Disallowed CORS origin"."""

    def __init__(self, app: ASGIApp, on_error: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.origins, self.on_error = tuple(kwargs.get("allow_origins", ())), on_error

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        origin = request_headers["origin"]
        method = request_headers["access-control-request-method"]
        asked = [h.strip() for h in request_headers.get("access-control-request-headers", "").split(",") if h.strip()]
        refused = []
        if not self.is_allowed_origin(origin=origin):
            refused.append(f"origin '{origin}' is not allowed (allowed: {', '.join(self.origins)}; "
                           f"the server allows another with --cors-origin)")
        if method not in self.allow_methods:
            refused.append(f"method '{method}' is not allowed (allowed: {', '.join(sorted(self.allow_methods))})")
        headers = [h for h in asked if h.lower() not in self.allow_headers]
        if headers:
            refused.append(f"header(s) {', '.join(headers)} not allowed (allowed: {', '.join(sorted(self.allow_headers))})")
        if "access-control-request-private-network" in request_headers and not self.allow_private_network:
            refused.append("private network access is not allowed")
        if self.on_error is not None:
            self.on_error("cors_rejected")
        # The CORS headers Starlette set stay: with an allowed origin the browser can read the error.
        return error_response(answer.status_code, "cors_rejected",
                              f"CORS preflight refused: {'; '.join(refused) or answer.body.decode()}",
                              {k: v for k, v in answer.headers.items() if k.startswith("access-control-") or k == "vary"})


def create_app(settings: ServeSettings) -> FastAPI:
    """The server as an ASGI app; models are loaded when it starts (lifespan), not here.

    Example:
        >>> app = create_app(ServeSettings(models=("runs/mnist",)))
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    metrics = ServeMetrics()
    # A worker (--workers): note the admin log's length before the key file and the checkpoints are
    # read, so the reloads logged after that are repeated once the models are loaded (serve.workers).
    admin_log = AdminLog(settings.worker_dir, settings.worker_index) if settings.worker_dir else None
    if admin_log is not None:
        admin_log.begin()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        workers = settings.decode_workers or available_cpus()
        app.state.decode_pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="decode"
        )
        registry = ModelRegistry(settings, metrics)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                None, registry.load_startup
            )  # blocking: off the loop
            app.state.recorder = await loop.run_in_executor(
                None, Recorder, settings, metrics
            )  # may open/migrate the store
        except ImageRecError as e:  # a damaged checkpoint, a store that cannot open: one line (QuietStartup)
            app.state.startup_error = e
            if admin_log is not None:  # a worker: the supervisor ends the command with this line
                admin_log.error = str(e)
                admin_log.report()
            registry.stop_all()  # the versions loaded before the one that failed
            app.state.decode_pool.shutdown(wait=False, cancel_futures=True)
            raise
        app.state.registry = registry
        app.state.admin = Admin(admin_actions(registry, app.state.keys), admin_log,
                                peer_timeout_s=max(120.0, settings.timeout_s))
        if admin_log is not None:  # a worker: repeat what the others were told before it started
            await loop.run_in_executor(None, functools.partial(app.state.admin.catch_up, startup=True))
            app.state.admin.follow()
        log.info(
            "serving %d model version(s); default %s@%s",
            len(registry.entries()),
            registry.default().name,
            registry.default().version,
        )
        metrics.watch_gc()
        try:
            yield
        finally:
            metrics.unwatch_gc()
            app.state.admin.stop()
            registry.stop_all()
            app.state.decode_pool.shutdown(wait=False, cancel_futures=True)
            app.state.recorder.close()

    app = FastAPI(
        title="imagerec",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # _add_docs: the same page with local assets
        redoc_url=None,
        description="Image classification with dynamic micro-batching. POST images to /v1/predict.",
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.keys = ApiKeys(settings.api_key_file)
    app.state.inflight = 0  # requests whose body has arrived (max_inflight)
    app.state.uploads = 0  # requests whose body is arriving (max_uploads)
    install_error_handlers(app, on_error=lambda type: metrics.errors.labels(type).inc())
    app.include_router(router)
    app.include_router(admin_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_docs(app)
    document_api_keys(app)
    # Each add_middleware wraps the ones before it: MetricsMiddleware(CORSMiddleware(
    # BodyLimitMiddleware(app))). CORS sits outside every layer that answers, so the early 413/400
    # of BodyLimitMiddleware carry Access-Control-Allow-Origin too (a browser shows a CORS failure
    # instead of the error otherwise); metrics are outermost and count every response, preflights
    # included.
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_body_bytes,
        on_error=lambda type: metrics.errors.labels(type).inc(),
    )
    if settings.cors_origins:
        app.add_middleware(
            JSONCORSMiddleware,
            on_error=lambda type: metrics.errors.labels(type).inc(),
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            max_age=600,
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=route_templates([*router.routes, *admin_router.routes, *app.routes]))
    return app


class QuietStartup:
    """The app as uvicorn runs it. A startup that fails with an ImageRecError (a damaged checkpoint)
    is not logged as the chained tracebacks Starlette hands uvicorn: `serve()` raises the error, so
    the command ends with its one `error:` line and exit status as every other command does; a
    worker process (--workers), whose output is its log, logs that line instead."""

    def __init__(self, app: FastAPI, log_error: bool) -> None:
        self.app, self.log_error = app, log_error

    @property
    def startup_error(self) -> ImageRecError | None:
        return getattr(self.app.state, "startup_error", None)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def quiet_send(message: Any) -> None:
            error = self.startup_error
            if message["type"] == "lifespan.startup.failed" and error is not None:
                message = {**message, "message": str(error) if self.log_error else ""}  # "": not logged
            await send(message)

        await self.app(scope, receive, quiet_send)


def create_server(settings: ServeSettings) -> uvicorn.Server:
    """A uvicorn server for `settings` (call `.run()`, or run it in a thread for tests)."""
    config = uvicorn.Config(
        QuietStartup(create_app(settings), log_error=settings.worker_dir is not None),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=http_protocol(settings.http),
        timeout_keep_alive=5,
        server_header=False,
        proxy_headers=False,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,  # oversized request heads -> 4xx (httptools: 431)
    )
    return uvicorn.Server(config)


def check_host(host: str, port: int) -> None:
    """Fail with one clear line when `host` does not resolve: before any model loads, not after
    (uvicorn only resolves it when it binds, once the lifespan has loaded every model)."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) and e.strerror else str(e)
        raise ImageRecError(
            f"cannot listen on host '{host}': it is neither an IP address nor a name that resolves "
            f"({reason}); use e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces)"
        ) from e


def serve(
    source: Sequence[str] | str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    queue_size: int = 256,
    api_key_file: str | None = None,
    max_body_mb: float = 20.0,
    max_pixels: int = 40_000_000,
    timeout_s: float = 30.0,
    cors_origins: Sequence[str] = (),
    db: str | None = None,
    workers: int = 1,
    **kwargs: Any,
) -> None:
    """Serve one or more models over HTTP until interrupted.

    `source` items are run directories or bundles, optionally named: "PATH", "NAME=PATH" or
    "NAME@VERSION=PATH"; the first is the default. `workers` > 1 runs that many server processes
    on the one port (serve.workers). Other ServeSettings fields go in `kwargs`.

    Example:
        >>> serve(["runs/mnist", "digits@2=runs/mnist-v2"], port=8000, api_key_file="keys.txt")
    """
    settings = create_settings(
        source,
        host=host,
        port=port,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        api_key_file=api_key_file,
        max_body_mb=max_body_mb,
        max_pixels=max_pixels,
        timeout_s=timeout_s,
        cors_origins=tuple(cors_origins),
        db=db,
        workers=workers,
        **kwargs,
    )
    check_host(settings.host, settings.port)
    if settings.loader is None:  # a missing folder: one line now, not a traceback from each worker's startup
        from imagerec.predict import check_model_path

        for source in settings.sources:
            check_model_path(source.path)
    if settings.workers > 1:
        check_picklable(settings)
        status = run_workers(settings)
        if status:
            raise SystemExit(status)
        return
    server = create_server(settings)
    try:
        server.run()
    except SystemExit:  # uvicorn's exit when the startup failed
        error = server.config.app.startup_error
        if error is not None:
            raise error from None
        raise
