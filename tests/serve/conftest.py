"""Fixtures for the serve tests: a trained run, real MNIST digits as PNG bytes, and real uvicorn
servers on 127.0.0.1 (in a background thread, or in a subprocess where RSS is measured)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

import imagerec
from imagerec.serve import ServeSettings, create_server

KEY = "test-key-0123456789abcdef"


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "mnist"
    imagerec.train(data="mnist-mini", out=str(out), epochs=1, limit_train=1000)
    return out


@pytest.fixture(scope="session")
def run_dir_b(tmp_path_factory: pytest.TempPathFactory, run_dir: Path) -> Path:
    """A second version in the same models folder: the same weights under another name is
    enough to test versions and switching (training a second run would cost another 5-10 s)."""
    import shutil

    out = run_dir.parent / "mnist-b"
    shutil.copytree(run_dir, out)
    return out


@pytest.fixture(scope="session")
def digits() -> list[bytes]:
    """200 real MNIST test digits as PNG files."""
    from imagerec.data import read_data

    arrays = read_data("mnist-mini").arrays["test"]
    return [png_bytes(np.asarray(arrays[i])) for i in range(200)]


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# serve test keys\n{KEY}\nsecond-key-abcdefghijklmnop\n")
    return path


@dataclass
class Running:
    url: str
    pid: int
    stop: Callable[[], None]

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=kwargs.pop("timeout", 30.0), **kwargs
        )


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} not ready after {timeout} s")


def start_thread_server(settings: ServeSettings) -> Running:
    """A real uvicorn server on 127.0.0.1:<free port> in a daemon thread of this process."""
    from dataclasses import replace

    server = create_server(
        replace(settings, host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)

    def stop() -> None:
        server.should_exit = True
        thread.join(15)

    return Running(url, os.getpid(), stop)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process_server(args: list[str]) -> Running:
    """`python -m imagerec.serve` style: serve() in a subprocess, so its RSS is its own."""
    port = free_port()
    code = (
        "import sys, json; from imagerec.serve import serve; "
        "kw = json.loads(sys.argv[2]); serve(json.loads(sys.argv[1]), **kw)"
    )
    import json

    sources = [a for a in args if not a.startswith("--")]
    kwargs: dict[str, Any] = {"host": "127.0.0.1", "port": port, "log_level": "warning"}
    for a in args:
        if a.startswith("--"):
            k, _, v = a[2:].partition("=")
            kwargs[k] = json.loads(v)
    # A file, not a pipe: nobody reads a pipe, and a full one would block the server.
    log = tempfile.NamedTemporaryFile(prefix="imagerec-serve-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(sources), json.dumps(kwargs)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=90)
    except RuntimeError:
        proc.kill()
        text = Path(log.name).read_text()[-3000:]
        Path(log.name).unlink()
        raise RuntimeError(text) from None

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        Path(log.name).unlink(missing_ok=True)

    return Running(url, proc.pid, stop)


@pytest.fixture(scope="module")
def server(run_dir: Path, run_dir_b: Path, key_file: Path) -> Iterator[Running]:
    """The shared server: two versions, API keys on, small limits so they are cheap to hit."""
    settings = ServeSettings(
        models=(f"mnist@1={run_dir}", f"mnist@2={run_dir_b}"),
        api_key_file=str(key_file),
        max_batch=32,
        max_wait_ms=10,
        queue_size=256,
        max_body_mb=2,
        max_files=8,
        max_pixels=4_000_000,
        max_inflight=128,
    )
    running = start_thread_server(settings)
    yield running
    running.stop()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def served_row(i: int) -> dict:
    """A row as `imagerec serve` hands it to the recorder (serve/routes.py)."""
    return {"request_id": f"{i:032x}", "created_at": "2025-03-04T05:06:07+00:00", "model": "a", "version": "3",
            "model_path": "/models/a", "sha256": f"{i:064x}", "name": f"{i}.png", "label": "7", "score": 0.9,
            "topk": [{"label": "7", "prob": 0.9}]}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)
