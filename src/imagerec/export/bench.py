"""`benchmark`: batch-1 latency and batch-N throughput of every runtime available for a run or bundle."""

from __future__ import annotations

import json
import logging
import math
import numbers
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagerec.config import PreprocessConfig
from imagerec.engine.checkpoint import load_model
from imagerec.export.bundle import Bundle, is_bundle, load_bundle
from imagerec.export.graph import example_input
from imagerec.export.runtime import Runtime, TorchRuntime
from imagerec.utils import (
    ImageRecError,
    cpu_supports_bf16,
    resolve_device,
    resolve_precision,
    run_precision,
    setup_compute,
)


def _source_model(bundle: Bundle) -> torch.nn.Module | None:
    """The PyTorch model a bundle was exported from, to time beside it, or None (with a warning
    saying why) when its run's checkpoint is gone or is no longer the one exported: a bundle is
    self-contained, and its own runtimes are benchmarked either way."""
    source = bundle.manifest.get("source") or {}
    if not source.get("run_dir"):
        return None  # exported from a model in memory (export_model): there is no run to compare with
    ckpt = Path(source["run_dir"]) / str(source.get("checkpoint") or "best.json")
    log = logging.getLogger("imagerec")
    skip = f"benchmark {bundle.path}: its runtimes only, without PyTorch (torch-fp32/torch-bf16) to compare with: " \
           f"its source checkpoint {ckpt}"
    if not ckpt.is_file():
        log.warning("%s is gone", skip)
        return None
    try:
        model, meta = load_model(ckpt)
    except ImageRecError as e:
        log.warning("%s cannot be loaded (%s)", skip, e)
        return None
    if source.get("weights_id") is not None:
        same = meta.get("weights_id") == source["weights_id"]
    else:  # a bundle from before the export recorded weights_id: what it did record must match
        same = (meta.get("model"), meta.get("model_kwargs", {}), (meta.get("data") or {}).get("fingerprint")) == (
            source.get("model"), source.get("model_kwargs", {}), source.get("data_fingerprint")
        ) and PreprocessConfig.from_dict(meta["preprocess"]) == bundle.pre
    if not same:
        log.warning("%s holds other weights than the ones exported (trained again since?)", skip)
        return None
    return model


def _runtimes(source: str | Path) -> tuple[list[tuple[Runtime, bool | None]], PreprocessConfig, str]:
    """[(runtime, passed its parity gate)], the preprocessing config, and the runtime predict uses."""
    found: list[tuple[Runtime, bool | None]] = []
    if is_bundle(source):
        bundle = load_bundle(source)
        pre, uses = bundle.pre, bundle.preferred_runtime
        for name in bundle.runtime_names:
            found.append((bundle.create_runtime(name), bool(bundle.runtime_entry(name)["parity"]["passed"])))
        model = _source_model(bundle)
    elif Path(source).exists():
        model, meta = load_model(source)
        pre = PreprocessConfig.from_dict(meta["preprocess"])
        # predict runs a run's model in the precision it trained with (Predictor.from_run), not "auto"
        device = resolve_device("cpu")
        amp = resolve_precision(run_precision((meta.get("train_config") or {}).get("precision"), device), device)
        uses = "torch-bf16" if amp == torch.bfloat16 else "torch-fp32"
    else:
        raise ImageRecError(f"model not found: {source} (give a run directory or a bundle folder)")
    if model is not None:
        found.insert(0, (TorchRuntime(model, pre, None), True))  # the reference itself
        if cpu_supports_bf16():
            found.insert(1, (TorchRuntime(model, pre, torch.bfloat16), None))  # not parity-gated
    return found, pre, uses


def _time_calls(runtime: Runtime, x: torch.Tensor, seconds: float) -> list[float]:
    for _ in range(2):
        runtime.run(x)  # warm-up: allocation, kernel selection, oneDNN primitive caches
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        runtime.run(x)
        times.append(time.perf_counter() - t0)
    return times


def check_benchmark_args(batch_sizes: tuple[int, ...], seconds: float) -> None:
    """Raise ImageRecError for batch sizes that are not whole numbers >= 1, or a time that is not a positive number."""
    if not len(batch_sizes):
        raise ImageRecError("no batch sizes given: pass one or more, e.g. batch_sizes=(1, 32) / --batch-sizes 1 32")
    bad = [b for b in batch_sizes if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1]
    if bad:
        raise ImageRecError(f"batch sizes must be whole numbers >= 1, got {', '.join(map(str, bad))} "
                            f"(batch_sizes / --batch-sizes), e.g. --batch-sizes 1 32")
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not math.isfinite(seconds) or seconds <= 0:
        raise ImageRecError(f"seconds must be a positive number (the time per runtime and batch size), got {seconds} "
                            f"(seconds / --seconds), e.g. --seconds 2")


def benchmark(source: str | Path, batch_sizes: tuple[int, ...] = (1, 32), seconds: float = 2.0) -> list[dict[str, Any]]:
    """Latency percentiles and throughput for every runtime of `source` (run directory or bundle).

    Inputs are pre-decoded uint8 batches, so this measures the model, not JPEG decoding. Each
    result says whether that runtime passed its parity gate and whether predict would use it.
    Batch sizes must be whole numbers >= 1 and `seconds` positive (ImageRecError otherwise).

    Example:
        >>> for r in benchmark("exports/mnist", seconds=1): print(r["runtime"], r["batch_size"], r["images_per_s"])
    """
    check_benchmark_args(batch_sizes, seconds)
    setup_compute()
    runtimes, pre, uses = _runtimes(source)
    results = []
    for runtime, passed in runtimes:
        for bs in batch_sizes:
            times = np.array(_time_calls(runtime, example_input(pre, bs), seconds)) * 1000.0
            results.append({
                "source": str(source), "runtime": runtime.name, "batch_size": bs,
                "input": f"uint8 {bs}x{pre.channels}x{pre.input_size}x{pre.input_size}",
                "p50_ms": round(float(np.percentile(times, 50)), 3), "p95_ms": round(float(np.percentile(times, 95)), 3),
                "p99_ms": round(float(np.percentile(times, 99)), 3), "calls": len(times),
                "images_per_s": round(bs * len(times) / (times.sum() / 1000.0), 1),
                "passed_parity": passed, "predict_uses": runtime.name == uses,
            })
    return results


def benchmark_command(source: str, fmt: str = "table", batch_sizes: tuple[int, ...] = (1, 32), seconds: float = 2.0) -> int:
    """`imagerec benchmark SOURCE`: print one JSON line per result (fmt json) or a table; returns the exit code."""
    if fmt not in ("table", "json"):
        raise ImageRecError(f"unknown output format '{fmt}': use table or json")
    results = benchmark(source, batch_sizes, seconds)
    if fmt == "json":
        for r in results:
            print(json.dumps(r))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"inference speed: {source}", style="table.title"))  # the path as written, not markup
    for col in ("runtime", "batch", "p50 ms", "p95 ms", "p99 ms", "images/s", "parity", "predict"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for r in results:
        parity = {True: "passed", False: "FAILED", None: "-"}[r["passed_parity"]]
        table.add_row(Text(r["runtime"]), str(r["batch_size"]), f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['images_per_s']:.0f}", parity, "<-" if r["predict_uses"] else "")
    Console().print(table)
    return 0
