"""/metrics carries what operators expect of any Prometheus target (process memory, CPU, open files,
the interpreter's GC counts) and the server's own garbage-collection pauses by generation: a pause
holds every request in flight, so a latency spike with an idle model shows up there."""

from __future__ import annotations

import gc
from pathlib import Path

import httpx
from conftest import metric_value, start_thread_server

from imagerec.serve.settings import ServeSettings


def test_metrics_has_process_figures_and_gc_pauses(run_dir: Path) -> None:
    running = start_thread_server(ServeSettings(models=(str(run_dir),)))
    try:
        gc.collect()  # the server runs in this process: its watcher times this one
        text = httpx.get(running.url + "/metrics").text
    finally:
        running.stop()
    assert metric_value(text, "process_resident_memory_bytes") > 50e6  # torch alone is more
    assert metric_value(text, "process_cpu_seconds_total") > 0
    assert metric_value(text, "process_open_fds") > 0
    assert metric_value(text, "python_gc_collections_total", generation="2") >= 1
    assert metric_value(text, "imagerec_gc_pause_seconds_count", generation="2") >= 1
    assert 0 < metric_value(text, "imagerec_gc_pause_seconds_sum", generation="2") < 60
    assert not any(getattr(cb, "__self__", None) is not None and type(cb.__self__).__name__ == "ServeMetrics"
                   for cb in gc.callbacks)  # unwatched at shutdown: a stopped server times nothing
