"""Prometheus metrics, one CollectorRegistry per app (so several apps/tests never collide)."""

from __future__ import annotations

import gc
import os
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Where worker processes (serve --workers) keep prometheus_client's multiprocess files; the
# library reads this variable when it is imported, so the supervisor sets it before spawning.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
GC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class ServeMetrics:
    """Request counts by route/status, latency, batch sizes, queue depth, errors by type."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "imagerec_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "imagerec_request_latency_seconds",
            "HTTP request latency by route template",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "imagerec_batch_size",
            "Images per model call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "imagerec_inference_seconds",
            "Time of one predict_batch call",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "imagerec_queue_depth",
            "Images waiting for a model call",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.errors = Counter(
            "imagerec_errors", "Error responses by error type", ["type"], registry=r
        )
        self.images = Counter(
            "imagerec_images", "Images predicted", ["model"], registry=r
        )
        self.unrecorded = Counter(
            "imagerec_predictions_unrecorded",
            "Predictions answered but not recorded in the store (--db): it stalled past the backlog or refused them",
            registry=r,
        )
        self.inflight = Gauge(
            "imagerec_inflight_requests",
            "Prediction requests whose body has arrived, being decoded or waiting for the model",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.uploads = Gauge(
            "imagerec_uploading_requests",
            "Prediction requests whose body is still arriving",
            registry=r,
            multiprocess_mode="livesum",
        )
        # Every request in flight waits while the interpreter collects garbage: the pauses, by
        # generation (watch_gc), are where a tail-latency spike with an idle model shows up.
        self.gc_pauses = Histogram(
            "imagerec_gc_pause_seconds",
            "Time the server process spent in one garbage collection, by generation",
            ["generation"],
            buckets=GC_BUCKETS,
            registry=r,
        )
        self._gc_started: float | None = None
        if not os.environ.get(MULTIPROC_ENV):
            # What operators expect of any Prometheus target: process_resident_memory_bytes,
            # process_cpu_seconds_total, process_open_fds, python_gc_*, python_info. With several
            # workers these would say one worker's figures under the name of all: left out there.
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                r.register(collector)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.gc_pauses.labels(str(info.get("generation", "?"))).observe(time.perf_counter() - self._gc_started)
            self._gc_started = None

    def watch_gc(self) -> None:
        """Time every garbage collection of this process (until unwatch_gc)."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def render(self) -> bytes:
        """This process's metrics; with several worker processes (serve --workers), all of theirs
        summed (gauges: live workers only)."""
        folder = os.environ.get(MULTIPROC_ENV)
        if not folder:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=folder)
        return generate_latest(merged)


UNMATCHED = "<unmatched>"  # the route label of a request no route answered


def count_rejected(metrics: ServeMetrics, method: str, status: int, type: str) -> None:
    """Count a request that the HTTP layer answered itself, before the app saw it (400
    bad_http_request, 431 headers_too_large: serve.http), as MetricsMiddleware and the error
    handlers count the others: in imagerec_requests_total (route "<unmatched>") and
    imagerec_errors_total by its error type."""
    metrics.requests.labels(UNMATCHED, method if method in _METHODS else "OTHER", str(status)).inc()
    metrics.errors.labels(type).inc()


def route_label(scope: Scope, known: Sequence[tuple[re.Pattern[str], str]] = ()) -> str:
    """The matched route's template (never the raw path: fuzzed URLs must not explode the label set).

    A request answered before routing (BodyLimitMiddleware's 413 by Content-Length) has no matched
    route: it is labelled with the template of the first `known` (path regex, template) that its
    path matches, as the same request streamed is labelled by the router ("/v1/predict" either way)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    for regex, template in known:
        if regex.match(scope.get("path", "")):
            return template
    return UNMATCHED


def route_templates(routes: Iterable[Any]) -> list[tuple[re.Pattern[str], str]]:
    """(path regex, template) of every route and mount that has them, for `route_label`."""
    out = []
    for route in routes:
        regex, template = getattr(route, "path_regex", None), getattr(route, "path", None)
        if isinstance(regex, re.Pattern) and isinstance(template, str):
            out.append((regex, template))
    return out


class MetricsMiddleware:
    """Counts every HTTP response by route template and status, and times it."""

    def __init__(
        self, app: ASGIApp, metrics: ServeMetrics, routes: Sequence[tuple[re.Pattern[str], str]] = ()
    ) -> None:
        self.app, self.metrics, self.routes = app, metrics, tuple(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = route_label(scope, self.routes)
            method = scope.get("method", "")
            method = method if method in _METHODS else "OTHER"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
