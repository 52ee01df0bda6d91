"""Load test for `imagerec serve` on loopback: served throughput vs offline batch throughput, and
p99 latency at half load vs batch-1 latency. Bounded in requests and time; prints one JSON line per result.

    python bench/serve_load.py                      # ResNet-18 at 224 px, CIFAR-10 JPEGs as requests
    python bench/serve_load.py --model mnist-cnn    # a tiny digit CNN: measures the server's own overhead
    python bench/serve_load.py --run runs/mnist --seconds 10 --clients 32

The ResNet-18 bundle has random weights (the speed of a 224 px ResNet-18 does not depend on what
it learned); it goes through the same export, parity gate and runtime choice as any bundle.
Targets: served/offline >= 0.85 with 0 errors; p99 at half load <= 4x batch-1 latency.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

MAX_REQUESTS = 200_000  # hard cap whatever --seconds says


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def start_server(
    run: str, max_batch: int, max_wait_ms: float
) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import sys; from imagerec.serve import serve; "
        f"serve([sys.argv[1]], host='127.0.0.1', port={port}, max_batch={max_batch}, max_wait_ms={max_wait_ms}, "
        "queue_size=1024, max_inflight=1024, log_level='warning')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, run],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")


def closed_loop(url: str, images: list[bytes], clients: int, seconds: float) -> dict:
    stop_at = time.monotonic() + seconds
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    count = [0]

    def client(w: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            i = w
            while time.monotonic() < stop_at and count[0] < MAX_REQUESTS:
                t = time.perf_counter()
                r = c.post(
                    "/v1/predict",
                    params={"top_k": 1},
                    files={"file": ("x", images[i % len(images)], "application/octet-stream")},
                )
                d = time.perf_counter() - t
                with lock:
                    count[0] += 1
                    if r.status_code == 200:
                        lat.append(d)
                    else:
                        errors[0] += 1
                i += clients

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    return {
        "img_per_s": len(lat) / wall,
        "requests": len(lat) + errors[0],
        "errors": errors[0],
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
    }


def open_loop(url: str, images: list[bytes], rate: float, seconds: float) -> dict:
    """Poisson arrivals at `rate`/s; latency counted from each request's scheduled time."""
    rng = random.Random(0)
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    local = threading.local()

    def one(i: int, scheduled: float) -> None:
        c = getattr(local, "c", None) or httpx.Client(base_url=url, timeout=30)
        local.c = c
        r = c.post(
            "/v1/predict",
            params={"top_k": 1},
            files={"file": ("x", images[i % len(images)], "application/octet-stream")},
        )
        d = time.perf_counter() - scheduled
        with lock:
            (
                lat.append(d)
                if r.status_code == 200
                else errors.__setitem__(0, errors[0] + 1)
            )

    t0 = time.perf_counter()
    t = t0
    n = 0
    with ThreadPoolExecutor(64) as pool:
        while t - t0 < seconds and n < MAX_REQUESTS:
            t += rng.expovariate(rate)
            delay = t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, n, t)
            n += 1
    return {
        "rate": rate,
        "requests": n,
        "errors": errors[0],
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
    }


def build_model(kind: str) -> str:
    import imagerec

    out = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if kind == "mnist-cnn":
        imagerec.train(data="mnist-mini", out=str(out / "mnist"), epochs=1, limit_train=1000)
        return str(out / "mnist")
    from imagerec.config import PreprocessConfig
    from imagerec.export import export_model, synthetic_images
    from imagerec.models import create_model

    torch.manual_seed(0)
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    pre = PreprocessConfig(224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 256, names)
    model = create_model("resnet18", num_classes=10, img_size=224).eval()
    export_model(model, pre, "onnx", out / "r18", int8=True, images=synthetic_images(pre, 32),
                 calibration=synthetic_images(pre, 64, seed=1).x, max_drop=100.0, timing_seconds=1.0)
    return str(out / "r18")


def request_images(kind: str, n: int = 256) -> list[bytes]:
    """Real images as clients would send them: PNG digits, or CIFAR-10 test JPEGs."""
    if kind == "mnist-cnn":
        from imagerec.data import read_data

        arrays = read_data("mnist-mini").arrays["test"]
        images = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.asarray(arrays[i])).save(buf, format="PNG")
            images.append(buf.getvalue())
        return images
    import tarfile

    archive = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
    images = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and "/test/" in member.name:
                images.append(tar.extractfile(member).read())
                if len(images) == n:
                    break
    return images


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", help="run directory or bundle to serve (default: built from --model)")
    ap.add_argument("--model", choices=("resnet18-224", "mnist-cnn"), default="resnet18-224")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    args = ap.parse_args()
    args.seconds = min(args.seconds, 120.0)

    import imagerec

    run = args.run or build_model(args.model)
    images = request_images(args.model)

    # Offline: the same Predictor on pre-decoded uint8 batches of max_batch (no HTTP, no decode).
    predictor = imagerec.load(run)
    x = torch.stack([predictor.preprocess(b) for b in images[: args.max_batch]])
    predictor.predict_batch(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min(args.seconds, 5.0):
        predictor.predict_batch(x)
        n += len(x)
    offline = n / (time.perf_counter() - t0)
    emit(
        bench="offline_predict_batch", batch=args.max_batch, img_per_s=round(offline, 1)
    )
    del predictor

    proc, url = start_server(run, args.max_batch, args.max_wait_ms)
    try:
        closed_loop(url, images, args.clients, 1.0)  # warm-up
        full = closed_loop(url, images, args.clients, args.seconds)
        emit(
            bench="served_concurrent",
            clients=args.clients,
            **{k: round(v, 2) for k, v in full.items()},
            ratio_to_offline=round(full["img_per_s"] / offline, 3),
            target_ratio=0.85,
        )
        single = closed_loop(url, images, 1, min(args.seconds, 5.0))
        emit(
            bench="served_batch1",
            clients=1,
            **{k: round(v, 2) for k, v in single.items()},
        )
        half = open_loop(url, images, full["img_per_s"] / 2, args.seconds / 2)
        emit(
            bench="served_half_load",
            **{k: round(v, 2) for k, v in half.items()},
            p99_over_batch1_p50=round(half["p99_ms"] / single["p50_ms"], 2),
            target=4.0,
        )
        text = httpx.get(url + "/metrics").text
        sums = [
            float(l.rsplit(" ", 1)[1])
            for l in text.splitlines()
            if l.startswith("imagerec_batch_size_sum")
        ]
        counts = [
            float(l.rsplit(" ", 1)[1])
            for l in text.splitlines()
            if l.startswith("imagerec_batch_size_count")
        ]
        emit(
            bench="server_batches",
            mean_batch=round(sum(sums) / max(sum(counts), 1), 2),
            batches=int(sum(counts)),
        )
    finally:
        proc.terminate()
        proc.wait(20)


if __name__ == "__main__":
    main()
