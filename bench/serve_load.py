"""Load test for `imagerec serve` on loopback: served throughput vs offline batch throughput, and
p99 latency at half load vs batch-1 latency. Bounded in requests and time; prints one JSON line per result.

    python bench/serve_load.py                      # ResNet-18 at 224 px, CIFAR-10 JPEGs as requests
    python bench/serve_load.py --model resnet50-224 # ResNet-50 at 224 px (MLPerf's serving model)
    python bench/serve_load.py --model mnist-cnn    # a tiny digit CNN (a PyTorch run: eager per-op
                                                    # overhead on the batcher threads dominates, not HTTP)
    python bench/serve_load.py --instances 2 --http auto h11   # httptools + uvloop vs uvicorn's h11
    python bench/serve_load.py --instances 2 --wait adaptive fixed  # batch wait: measured vs always max
    python bench/serve_load.py --workers 1 2 --instances 0   # one server process vs two (serve --workers)
    python bench/serve_load.py --instances 2 --server-max-batch 32 1 --half-rate 40  # batch caps, one load
    python bench/serve_load.py --run runs/mnist --seconds 10 --clients 32

The full load (32 closed-loop clients) comes from `wrk` (a C load generator: `apt-get install
wrk`) when it is installed, with bench/serve_load.lua; else from Python threads with httpx
(`--load-generator python`: on 2 cores 32 httpx threads took enough CPU to cut the served rate and
the batch size). Batch-1 and half load come from `RawHttp`, an asyncio client that sends prebuilt
requests on a Poisson schedule (open loop) at ~0.3 ms of Python a request, in `--rounds`
alternating phases pooled into one distribution each, so both see the same mix of the shared VM's
fast and slow seconds.

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
import asyncio
import gc
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


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams for the batch-1 and half-load phases:
    one prebuilt multipart POST per image, answers read by Content-Length. It costs the server's
    cores little (~0.3 ms of Python a request, measured: `client_cpu_ms_per_request`), it keeps its
    connections open between phases (no start-up burst), and it sends on a schedule whatever the
    answers do (open loop: no coordinated omission), which wrk cannot (no fixed-rate mode; wrk2 is
    not in Debian)."""

    boundary = "imagerec-bench-7f3a9c"

    def __init__(self, url: str, images: list[bytes]) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.requests = [self._request(data) for data in images]
        # (reader, writer, when it was last answered); uvicorn closes a connection idle for 5 s
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.failures: dict[str, int] = {}

    def _request(self, data: bytes) -> bytes:
        body = (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"image\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{self.boundary}--\r\n".encode()
        head = (f"POST /v1/predict?top_k=1 HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: multipart/form-data; boundary={self.boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The most recently used idle connection, or a new one; those idle for 4 s are closed
        first, before the server's keep-alive timeout can close them under a request."""
        while self.idle:
            reader, writer, used = self.idle.pop()
            if time.monotonic() - used < 4.0:
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    async def post(self, i: int) -> bool:
        """Send image i; True for a 200 answer. A connection that fails is dropped; every failure
        is counted in `failures` by HTTP status or exception name."""
        reader, writer = await self._connection()

        async def exchange() -> bytes:
            writer.write(self.requests[i % len(self.requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            return head

        try:
            head = await asyncio.wait_for(exchange(), 30.0)  # bounded in time, as wrk's --timeout 30s
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            writer.close()
            self.failures[type(e).__name__] = self.failures.get(type(e).__name__, 0) + 1
            return False
        self.idle.append((reader, writer, time.monotonic()))
        status = head[9:12].decode("latin-1")
        if status != "200":
            self.failures[status] = self.failures.get(status, 0) + 1
        return status == "200"

    async def lone(self, seconds: float, start: int) -> tuple[list[float], int]:
        """One request at a time for `seconds`: (latencies in ms, errors)."""
        lat, errors, i = [], 0, start
        stop_at = time.perf_counter() + seconds
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            if await self.post(i):
                lat.append((time.perf_counter() - t) * 1e3)
            else:
                errors += 1
            i += 1
        return lat, errors

    async def poisson(self, rate: float, seconds: float, rng: random.Random, start: int) -> tuple[list[float], int]:
        """Poisson arrivals at `rate`/s for `seconds`, each timed from its scheduled send; returns when
        all are answered: (latencies in ms, errors)."""
        lat, errors = [], [0]

        async def one(i: int, scheduled: float) -> None:
            if await self.post(i):
                lat.append((time.perf_counter() - scheduled) * 1e3)
            else:
                errors[0] += 1

        tasks, t0 = [], time.perf_counter()
        t, i = t0, start
        while t - t0 < seconds:
            t += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(i, t)))
            i += 1
        await asyncio.gather(*tasks)
        return lat, errors[0]


class GcPauses:
    """This process's garbage collections while it is the load client (`gc.callbacks`). Here the
    client shares its process with torch, OpenVINO and the offline baseline's Predictor (~450k
    objects): a full collection then takes 100-300 ms, and an open-loop client, timing each request
    from its scheduled send, counts that pause as the server's latency. The server freezes its heap
    after loading for the same reason (serve.registry.freeze_heap); `--client-gc freeze` (the
    default) does the same here, and each half-load row says what the client's collections cost."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, ms)
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], (time.perf_counter() - self._start) * 1e3))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> dict:
        full = [ms for gen, ms in self.pauses if gen == 2]
        return {"collections": len(self.pauses), "full": len(full),
                "max_ms": round(max((ms for _, ms in self.pauses), default=0.0), 1),
                "full_max_ms": round(max(full, default=0.0), 1)}


def lone_and_half_load(url: str, images: list[bytes], rate: float, rounds: int, single_s: float,
                       half_s: float, client_gc: str = "freeze") -> tuple[dict, dict, list[float]]:
    """Batch-1 (one client) and half load (Poisson at `rate`) in `rounds` alternating phases, each
    pooled over its rounds: (batch-1 row, half-load row, each round's batch-1 p50). The half-load
    row also gives the client's own CPU time per request and its garbage collections (`GcPauses`);
    `client_gc` "freeze" freezes this process's heap first, "default" leaves Python's collector as is."""

    async def run() -> tuple[dict, dict, list[float]]:
        cpu0 = time.process_time()
        client, rng = RawHttp(url, images), random.Random(0)
        single, half, per_round, n = [], [], [], 0
        errors = [0, 0]
        for _ in range(rounds):
            lat, err = await client.lone(single_s, n)
            single += lat
            per_round.append(pct(lat, 50))
            errors[0] += err
            n += len(lat) + err
            lat, err = await client.poisson(rate, half_s, rng, n)
            half += lat
            errors[1] += err
            n += len(lat) + err
        for _, writer, _ in client.idle:
            writer.close()
        rows = [{"img_per_s": len(lat) / (rounds * secs), "requests": len(lat) + err, "errors": err,
                 "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
                for lat, err, secs in ((single, errors[0], single_s), (half, errors[1], half_s))]
        rows[1]["client_cpu_ms_per_request"] = (time.process_time() - cpu0) * 1e3 / max(1, n)
        if client.failures:
            rows[1]["failures"] = client.failures  # both phases
        return rows[0], rows[1], per_round

    if client_gc == "freeze":
        gc.collect()  # before the pauses are counted: this one is the ~0.3 s the rounds must not see
        gc.freeze()
    try:
        with GcPauses() as pauses:
            single, half, per_round = asyncio.run(run())
    finally:
        gc.unfreeze()
    half["client_gc"] = {"mode": client_gc, **pauses.summary()}
    return single, half, per_round


def wrk_load(url: str, list_file: Path, connections: int, seconds: float) -> dict:
    """One closed-loop wrk run (1 thread)."""
    script = Path(__file__).with_suffix(".lua")
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
           "-s", str(script), url, "--", str(list_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    found = re.search(r"^IMAGEREC (\{.*\})$", proc.stdout, re.M)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"wrk failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    r = json.loads(found.group(1))
    ok = r["requests"] - r["status_errors"]
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
    arch = kind.removesuffix("-224")
    model = create_model(arch, num_classes=10, img_size=224).eval()
    export_model(model, pre, "onnx", out / arch, int8=True, images=synthetic_images(pre, 32),
                 calibration=synthetic_images(pre, 64, seed=1).x, max_drop=100.0, min_agreement=0.0,
                 timing_seconds=1.0)
    return str(out / arch)


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
    ap.add_argument("--model", choices=("resnet18-224", "resnet50-224", "mnist-cnn"), default="resnet18-224")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10,
                    help="batch-1 and half load alternate in this many rounds, each pooled over them (1: one "
                         "seconds/2 batch-1 phase, then one 2 x seconds half-load phase)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--server-max-batch", type=int, nargs="+",
                    help="the servers' --max-batch values to measure, one server each (default: --max-batch, which "
                         "also sets the offline baselines' batch)")
    ap.add_argument("--half-rate", type=float, metavar="IMG_PER_S",
                    help="the half load's rate for every server (default: half of each server's own full-load rate; "
                         "fixed, servers whose full-load rates differ are compared at one load)")
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
    ap.add_argument("--client-gc", nargs="+", choices=("freeze", "default"), default=["freeze"],
                    help="the load client's garbage collector during batch-1 and half load, each measured in turn: "
                         "freeze (its heap frozen first, as the server's is) or default (a full collection of "
                         "this process pauses every request in flight for 100-300 ms; see GcPauses)")
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
    served: dict[tuple[int, int, str, str, int], float] = {}
    try:
        for variant in itertools.product(args.workers, args.instances, args.http, args.wait,
                                         args.server_max_batch or [args.max_batch]):
            proc, url = start_server(run, variant[-1], args.max_wait_ms, *variant[:-1])
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
    for (workers, instances, http, wait, max_batch), rate in served.items():
        emit(bench="served_vs_offline_bracketed", workers=workers, instances=instances, http=http, wait=wait,
             max_batch=max_batch,
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
                   offline: float, ceiling: float, workers: int, instances: int, http: str, wait: str,
                   max_batch: int) -> float:
    """Full load, batch-1 and half load against one running server; one JSON line each. Returns
    the served rate under full load."""
    if gen == "wrk":
        closed = lambda clients, seconds: wrk_load(url, list_file, clients, seconds)  # noqa: E731
    else:
        closed = lambda clients, seconds: closed_loop(url, images, clients, seconds)  # noqa: E731
    common = {"load_generator": gen, "workers": workers, "instances": instances, "http": http, "wait": wait,
              "max_batch": max_batch}
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
    # Batch-1 and half load alternate in short rounds, each pooled over all of them: this machine's
    # speed swings 1.5-2.4x from one second to the next (docs/performance.md), so one 5 s batch-1
    # phase and one 20 s half-load phase after it compared two different machines. Half load gets
    # 4x batch-1's time: its p99 needs the samples.
    single_s, half_s = args.seconds / 2 / args.rounds, 2 * args.seconds / args.rounds
    common |= {"rounds": args.rounds, "load_generator": "raw-http"}
    for client_gc in args.client_gc:
        half_rate = args.half_rate or full["img_per_s"] / 2
        single, half, per_round = lone_and_half_load(url, images, half_rate, args.rounds, single_s,
                                                     half_s, client_gc)
        emit(bench="served_batch1", **common, clients=1, seconds_per_round=round(single_s, 2), **rounded(single),
             round_p50_ms_min=round(min(per_round), 2), round_p50_ms_max=round(max(per_round), 2))
        emit(
            bench="served_half_load",
            **common,
            target_rate=round(half_rate, 1),
            seconds_per_round=round(half_s, 2),
            **rounded(half),
            p99_over_batch1_p50=round(half["p99_ms"] / single["p50_ms"], 2),
            target=4.0,
        )
    text = httpx.get(url + "/metrics").text
    total = {}
    for key in ("imagerec_batch_size_sum", "imagerec_batch_size_count"):
        total[key] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(key))
    # The server's own garbage-collection pauses over all its loads (imagerec_gc_pause_seconds): a
    # full collection holds every request in flight, the suspect of the ~0.3 s stall (docs/performance.md, session 21).
    gc_pauses = {"collections": 0, "over_50ms": 0, "seconds": 0.0}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("imagerec_gc_pause_seconds_count"):
            gc_pauses["collections"] += int(float(value))
        elif name.startswith("imagerec_gc_pause_seconds_sum"):
            gc_pauses["seconds"] = round(gc_pauses["seconds"] + float(value), 3)
        elif name.startswith("imagerec_gc_pause_seconds_bucket") and 'le="0.05"' in name:
            gc_pauses["over_50ms"] -= int(float(value))
    gc_pauses["over_50ms"] += gc_pauses["collections"]
    batching = httpx.get(url + "/v1/models").json()["models"][0].get("batching", {})
    emit(
        bench="server_batches",
        workers=workers,
        instances=instances,
        http=http,
        wait=wait,
        max_batch=max_batch,
        wait_ms=batching.get("wait_ms"),
        measured=batching.get("measured"),
        mean_batch=round(total["imagerec_batch_size_sum"] / max(total["imagerec_batch_size_count"], 1), 2),
        batches=int(total["imagerec_batch_size_count"]),
        server_gc=gc_pauses,
    )
    return full["img_per_s"]

if __name__ == "__main__":
    main()
