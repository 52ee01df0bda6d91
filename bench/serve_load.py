"""Load test for `imagerec serve` on loopback: served throughput vs offline batch throughput, and
p99 latency at half load vs batch-1 latency. Bounded in requests and time; prints one JSON line per result.

    python bench/serve_load.py                      # ResNet-18 at 224 px, CIFAR-10 JPEGs as requests
    python bench/serve_load.py --model mnist-cnn    # a tiny digit CNN (a PyTorch run: eager per-op
                                                    # overhead on the batcher threads dominates, not HTTP)
    python bench/serve_load.py --instances 2 --http auto h11   # httptools + uvloop vs uvicorn's h11
    python bench/serve_load.py --instances 2 --wait adaptive fixed  # batch wait: measured vs always max
    python bench/serve_load.py --workers 1 2 --instances 0   # one server process vs two (serve --workers)
    python bench/serve_load.py --run runs/mnist --seconds 10 --clients 32

The load comes from `wrk` (a C load generator: `apt-get install wrk`) when it is installed, with
bench/serve_load.lua; else from Python threads with httpx (`--load-generator python`). On a
2-core machine the Python generator competes with the server for the cores: 32 httpx threads
took enough CPU to cut the served rate and the batch size (README, "Serving").

The ResNet-18 bundle has random weights (the speed of a 224 px ResNet-18 does not depend on what
it learned); it goes through the same export, parity gate and runtime choice as any bundle.
Each `--instances` value (default 1 and 2) gets its own server and its own three loads, so
one model instance using all cores and two instances of one core each are compared in one run.
Targets: served/offline >= 0.85 with 0 errors, where offline is `Predictor.predict` on the same
encoded images (what `imagerec predict` does: decode, preprocess, batched inference; the ratio to
inference alone on pre-decoded batches is printed too); p99 at half load <= 4x batch-1 latency.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import re
import shutil
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


def rounded(row: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def start_server(
    run: str, max_batch: int, max_wait_ms: float, workers: int = 1, instances: int = 1, http: str = "auto",
    wait: str = "adaptive",
) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import sys; from imagerec.serve import serve; "
        f"serve([sys.argv[1]], host='127.0.0.1', port={port}, max_batch={max_batch}, max_wait_ms={max_wait_ms}, "
        f"workers={workers}, instances={instances}, http='{http}', adaptive_wait={wait == 'adaptive'}, queue_size=1024, max_inflight=1024, log_level='warning')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, run],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    seen: set[int] = set()  # with --workers, every worker must answer ready (new connections reach any)
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/readyz", timeout=1)
            if r.status_code == 200:
                seen.add(r.json().get("worker", {}).get("index", 0))
                if len(seen) == workers:
                    return proc, url
                continue
        except httpx.HTTPError:
            pass
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


def wrk_load(url: str, list_file: Path, connections: int, seconds: float, think_ms: float = 0.0) -> dict:
    """One wrk run (1 thread): closed loop when think_ms is 0, else exponential think times (each
    connection's first request is then a /healthz, kept out of the counts and percentiles)."""
    script = Path(__file__).with_suffix(".lua")
    warmup = connections if think_ms > 0 else 0
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
           "-s", str(script), url, "--", str(list_file), str(think_ms), str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    found = re.search(r"^IMAGEREC (\{.*\})$", proc.stdout, re.M)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"wrk failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    r = json.loads(found.group(1))
    ok = r["requests"] - r["status_errors"]  # healthz answers are not counted as images
    wall = r["duration_us"] / 1e6
    kinds = ("status", "connect", "read", "write")
    return {"img_per_s": ok / wall, "rate": r["requests"] / wall, "requests": r["requests"], "errors": r["errors"],
            **{f"{k}_errors": r[f"{k}_errors"] for k in kinds if r[f"{k}_errors"]},
            "p50_ms": r["p50_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3}


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


def offline_rates(run: str, images: list[bytes], args: argparse.Namespace,
                  label: str = "offline_predict") -> tuple[float, float]:
    """Offline, two baselines with the same Predictor and the same request images:
    - predict: `imagerec predict` on the encoded images (decode + preprocess in its pool, batched
      inference): the same work the server does per image, minus HTTP. The target's baseline.
    - predict_batch: inference alone on pre-decoded uint8 batches of max_batch: the ceiling.
    The Predictor is gone when this returns, before any server starts."""
    import imagerec

    predictor = imagerec.load(run)
    predictor.batch_size = args.max_batch

    def rate(fn, per_call: int) -> float:
        fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min(args.seconds, 5.0):
            fn()
            n += per_call
        return n / (time.perf_counter() - t0)

    x = torch.stack([predictor.preprocess(b) for b in images[: args.max_batch]])
    offline = rate(lambda: predictor.predict(images), len(images))
    emit(bench=label, batch=args.max_batch, images=len(images), img_per_s=round(offline, 1),
         runtime=getattr(predictor.runtime, "name", "torch"))
    ceiling = rate(lambda: predictor.predict_batch(x), len(x))
    emit(bench=label + "_batch", batch=args.max_batch, img_per_s=round(ceiling, 1), note="inference only")
    return offline, ceiling


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
    ap.add_argument("--load-generator", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--workers", type=int, nargs="+", default=[1],
                    help="server processes to measure, one server each (serve --workers)")
    ap.add_argument("--instances", type=int, nargs="+", default=[1, 2],
                    help="server model instances to measure, one server each (serve --instances; 0: the server's "
                         "default, 2 single-core copies in one process, 1 in each of 2 pinned workers)")
    ap.add_argument("--http", nargs="+", choices=("auto", "h11"), default=["auto"],
                    help="HTTP parsers to measure, one server each: auto = httptools (C), h11 = pure Python")
    ap.add_argument("--wait", nargs="+", choices=("adaptive", "fixed"), default=["adaptive"],
                    help="batch wait policies to measure, one server each: adaptive (the default: at most the "
                         "measured per-batch overhead, and only while another request is on its way) or fixed "
                         "(always up to --max-wait-ms: serve --fixed-wait)")
    args = ap.parse_args()
    gen = args.load_generator
    if gen == "auto":
        gen = "wrk" if shutil.which("wrk") else "python"
    elif gen == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--load-generator wrk: wrk is not installed (apt-get install wrk)")
    args.seconds = min(args.seconds, 120.0)

    run = args.run or build_model(args.model)
    images = request_images(args.model)
    offline, ceiling = offline_rates(run, images, args)

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    list_file = tmp / "images.txt"
    paths = []
    for i, data in enumerate(images):
        (tmp / f"{i}.img").write_bytes(data)
        paths.append(str(tmp / f"{i}.img"))
    list_file.write_text("\n".join(paths) + "\n")
    served: dict[tuple[int, int, str, str], float] = {}
    try:
        for variant in itertools.product(args.workers, args.instances, args.http, args.wait):
            proc, url = start_server(run, args.max_batch, args.max_wait_ms, *variant)
            try:
                served[variant] = measure_server(url, gen, list_file, images, args, offline, ceiling, *variant)
            finally:
                proc.terminate()
                proc.wait(20)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # The offline baseline again, after the servers: on a shared VM the speed drifts over the tens
    # of seconds between the first baseline and the last served phase (steal time reached 29% in
    # some seconds of a run on the session-6 machine), so each served rate is also compared with the
    # mean of the baselines taken before and after it.
    after, _ = offline_rates(run, images, args, label="offline_predict_after")
    for (workers, instances, http, wait), rate in served.items():
        emit(bench="served_vs_offline_bracketed", workers=workers, instances=instances, http=http, wait=wait,
             img_per_s=round(rate, 1),
             offline_before=round(offline, 1), offline_after=round(after, 1),
             ratio=round(2 * rate / (offline + after), 3), target_ratio=0.85)


def settle(url: str, timeout: float = 30.0) -> None:
    """Wait until the server has no request in flight: a closed-loop run leaves up to one request
    per client queued when the load generator stops, and the next phase must not wait behind them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", timeout=10).text
        found = re.search(r"^imagerec_inflight_requests ([0-9.e+]+)$", text, re.MULTILINE)
        if found and float(found.group(1)) == 0:
            return
        time.sleep(0.05)
    raise SystemExit(f"server at {url} still busy {timeout} s after the load stopped")


def measure_server(url: str, gen: str, list_file: Path, images: list[bytes], args: argparse.Namespace,
                   offline: float, ceiling: float, workers: int, instances: int, http: str, wait: str) -> float:
    """Full load, batch-1 and half load against one running server; one JSON line each. Returns
    the served rate under full load."""
    if gen == "wrk":
        closed = lambda clients, seconds: wrk_load(url, list_file, clients, seconds)  # noqa: E731
        # 64 connections with exponential think times of mean 64/rate: Poisson-like arrivals.
        half_load = lambda rate, seconds: wrk_load(url, list_file, 64, seconds, 64_000 / rate)  # noqa: E731
    else:
        closed = lambda clients, seconds: closed_loop(url, images, clients, seconds)  # noqa: E731
        half_load = lambda rate, seconds: open_loop(url, images, rate, seconds)  # noqa: E731
    common = {"load_generator": gen, "workers": workers, "instances": instances, "http": http, "wait": wait}
    closed(args.clients, 1.0)  # warm-up
    full = closed(args.clients, args.seconds)
    emit(
        bench="served_concurrent",
        **common,
        clients=args.clients,
        **rounded(full),
        ratio_to_offline=round(full["img_per_s"] / offline, 3),
        ratio_to_inference_only=round(full["img_per_s"] / ceiling, 3),
        target_ratio=0.85,
    )
    settle(url)
    single = closed(1, min(args.seconds, 5.0))
    emit(bench="served_batch1", **common, clients=1, **rounded(single))
    settle(url)
    half = half_load(full["img_per_s"] / 2, 2 * args.seconds)  # twice as long: p99 needs the samples
    emit(
        bench="served_half_load",
        **common,
        target_rate=round(full["img_per_s"] / 2, 1),
        **rounded(half),
        p99_over_batch1_p50=round(half["p99_ms"] / single["p50_ms"], 2),
        target=4.0,
    )
    text = httpx.get(url + "/metrics").text
    total = {}
    for key in ("imagerec_batch_size_sum", "imagerec_batch_size_count"):
        total[key] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(key))
    batching = httpx.get(url + "/v1/models").json()["models"][0].get("batching", {})
    emit(
        bench="server_batches",
        workers=workers,
        instances=instances,
        http=http,
        wait=wait,
        wait_ms=batching.get("wait_ms"),
        measured=batching.get("measured"),
        mean_batch=round(total["imagerec_batch_size_sum"] / max(total["imagerec_batch_size_count"], 1), 2),
        batches=int(total["imagerec_batch_size_count"]),
    )
    return full["img_per_s"]

if __name__ == "__main__":
    main()
