"""Export speed bench: ResNet-18 at 224x224 on this CPU, one JSON line per result.

Compares, on the same model in the same process:
- imagerec's predict path (`Predictor.predict_batch` on pre-decoded uint8 batches, through the
  runtime the bundle prefers, and through eager PyTorch as for a run directory),
- the raw runtime calls with nothing around them (OpenVINO compiled-model calls, bf16 and int8;
  ORT `session.run` on a prepared array, fp32 and
  int8; PyTorch bf16 autocast and fp32 on a prepared normalised float tensor),
and prints the predict-path / best-raw ratios for batch-N throughput and batch-1 latency.
Weights are random (speed does not depend on them), so the int8 gate is opened (max_drop=100, min_agreement=0).

Usage: python bench/export.py [--seconds 1.5] [--batch 32]   (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from imagerec.config import PreprocessConfig
from imagerec.export import export_model, load_bundle, synthetic_images
from imagerec.export.graph import example_input
from imagerec.export.runtime import keep_signal_stack
from imagerec.models import create_model
from imagerec.predict import Predictor
from imagerec.transforms import normalize_batch
from imagerec.utils import available_cpus, cpu_supports_bf16, setup_compute


def measure_interleaved(cases: dict[str, Callable[[], object]], seconds: float, min_rounds: int = 5) -> dict[str, np.ndarray]:
    """Seconds per call of every case, calling each once per round in turn: on a CPU shared with other
    jobs, paired rounds see the same contention, so ratios between cases stay meaningful."""
    for fn in cases.values():
        fn(), fn()  # warm-up: allocation, kernel selection, primitive caches
    times: dict[str, list[float]] = {k: [] for k in cases}
    end = time.perf_counter() + seconds
    rounds = 0
    while time.perf_counter() < end or rounds < min_rounds:
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        rounds += 1
    return {k: np.array(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.5, help="per case and batch size (cases are interleaved)")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    setup_compute()
    torch.manual_seed(0)
    pre = PreprocessConfig(224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 256, tuple(str(i) for i in range(10)))
    model = create_model("resnet18", num_classes=10, img_size=224).eval()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = export_model(model, pre, "onnx", Path(tmp) / "r18", int8=True, images=synthetic_images(pre, 32),
                                calibration=synthetic_images(pre, 64, seed=1).x, max_drop=100.0, min_agreement=0.0,
                                timing_seconds=1.0)
        export_s = time.perf_counter() - t0
        bundle = load_bundle(Path(tmp) / "r18")
        ort = {n: bundle.create_runtime(n) for n in ("onnx-fp32", "onnx-int8")}
        ov_raw = {}
        try:
            import openvino as ov  # raw OpenVINO, compiled here directly, not through imagerec's runtime class

            core = ov.Core()
            ov_cfg = {"INFERENCE_NUM_THREADS": available_cpus(), "INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
            with keep_signal_stack():  # openvino leaves a dangling signal stack otherwise (runtime.py)
                ov_raw = {name: core.compile_model(core.read_model(str(Path(tmp) / "r18" / f)), "CPU", ov_cfg)
                          for name, f in (("bf16", "model.onnx"), ("int8", "model.int8.onnx"))}
        except ImportError:
            print(json.dumps({**{"event": "note"}, "openvino": "not installed: raw OpenVINO baselines skipped"}))
        bundle_pred = Predictor.from_bundle(Path(tmp) / "r18")
        eager_pred = Predictor(model, pre, device="cpu", precision="auto")
        common = {"model": "resnet18", "input": "3x224x224", "threads": available_cpus(), "torch": torch.__version__,
                  "onnxruntime": manifest["versions"]["onnxruntime"], "export_seconds": round(export_s, 1)}
        print(json.dumps({**common, "event": "export", "preferred_runtime": bundle.preferred_runtime,
                          "int8_agreement_random_weights": manifest["runtimes"][1]["parity"]["top1_agreement"],
                          "export_timing": {r["name"]: r["images_per_s"] for r in manifest["runtimes"]}}))

        results: dict[tuple[str, int], dict] = {}
        for bs in (1, args.batch):
            x = example_input(pre, bs, seed=2)  # uint8 (B, 3, 224, 224): pre-decoded images
            x_np = np.ascontiguousarray(x.numpy())
            x_float = normalize_batch(x, pre.mean, pre.std).contiguous(memory_format=torch.channels_last)
            cl_model = eager_pred.model  # channels_last already

            def torch_raw(dtype: torch.dtype | None, cl_model: torch.nn.Module = cl_model, x_float: torch.Tensor = x_float) -> Callable[[], object]:
                def call() -> object:
                    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                        return cl_model(x_float)
                return call

            cases: dict[str, tuple[str, Callable[[], object]]] = {
                f"predict:{bundle_pred.runtime.name}": ("predict", lambda x=x: bundle_pred.predict_batch(x)),
                f"predict:torch-{'bf16' if eager_pred.amp_dtype == torch.bfloat16 else 'fp32'}": ("predict", lambda x=x: eager_pred.predict_batch(x)),
                "raw:ort-fp32": ("raw", lambda x_np=x_np: ort["onnx-fp32"].session.run(None, {"image": x_np})),
                "raw:ort-int8": ("raw", lambda x_np=x_np: ort["onnx-int8"].session.run(None, {"image": x_np})),
                **({"raw:openvino-bf16": ("raw", lambda x_np=x_np: ov_raw["bf16"](x_np)),
                    "raw:openvino-int8": ("raw", lambda x_np=x_np: ov_raw["int8"](x_np))} if ov_raw else {}),
                # bf16 only where the CPU has it natively: emulated bf16 is ~100x slower than fp32
                **({"raw:torch-bf16": ("raw", torch_raw(torch.bfloat16))} if cpu_supports_bf16() else {}),
                "raw:torch-fp32": ("raw", torch_raw(None)),
            }
            timed = measure_interleaved({k: fn for k, (_, fn) in cases.items()}, args.seconds * len(cases))
            for name, (kind, _) in cases.items():
                t = timed[name] * 1000.0
                r = {**common, "event": "measure", "path": name, "kind": kind, "batch_size": bs,
                     "images_per_s": round(bs * len(t) / (t.sum() / 1000.0), 1), "p50_ms": round(float(np.percentile(t, 50)), 2),
                     "p95_ms": round(float(np.percentile(t, 95)), 2), "p99_ms": round(float(np.percentile(t, 99)), 2), "calls": len(t)}
                results[(name, bs)] = r
                print(json.dumps(r), flush=True)

        chosen = f"predict:{bundle_pred.runtime.name}"
        for bs, metric in ((args.batch, "images_per_s"), (1, "p50_ms")):
            raws = {n: r for (n, b), r in results.items() if b == bs and r["kind"] == "raw"}
            best = (max if metric == "images_per_s" else min)(raws.values(), key=lambda r: r[metric])
            ours = results[(chosen, bs)]
            print(json.dumps({**common, "event": "ratio", "batch_size": bs, "metric": metric, "predict_path": chosen,
                              "predict_value": ours[metric], "best_raw": best["path"], "best_raw_value": best[metric],
                              "predict_over_best_raw": round(ours[metric] / best[metric], 3)}))
        fp32, int8 = results[("raw:ort-fp32", args.batch)], results[("raw:ort-int8", args.batch)]
        print(json.dumps({**common, "event": "int8_speedup", "batch_size": args.batch, "ort_fp32_images_per_s": fp32["images_per_s"],
                          "ort_int8_images_per_s": int8["images_per_s"], "speedup": round(int8["images_per_s"] / fp32["images_per_s"], 2)}))


if __name__ == "__main__":
    main()
