"""The web page in headless Debian chromium: upload a real MNIST digit, see the predicted label.

Both the server (`imagerec serve`) and the Playwright driver run as their own processes, as a user
would run them. (The SIGSEGV that once hit this test in the pytest process was OpenVINO leaving a
dangling signal stack on the main thread, fixed in export/runtime.py: keep_signal_stack.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DRIVER = Path(__file__).resolve().parent / "browser_driver.py"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_page_classifies_an_uploaded_digit(run_dir, digits, tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api")
    digit = tmp_path / "mnist-test-7.png"
    digit.write_bytes(digits[7])
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve-page.png"
    shot.unlink(missing_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "imagerec.cli", "serve", f"mnist@1={run_dir}", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stderr.read().decode()[-2000:] if server.stderr else "server exited"
            assert time.monotonic() < deadline, "server not ready in 90 s"
            time.sleep(0.3)
        api = httpx.post(url + "/v1/predict", files={"file": (digit.name, digits[7], "image/png")}, timeout=30).json()
        expected = api["predictions"][0]
        proc = subprocess.run([sys.executable, str(DRIVER), url, str(digit), str(shot)],
                              capture_output=True, text=True, timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["chips"] == 10 and seen["metrics_visible"]
    assert seen["label"] == expected["label"]  # the page shows what the API answers for the same bytes
    assert len(seen["bars"]) == 5 and seen["bars"][0].startswith(expected["topk"][0]["label"])
    assert seen["console_errors"] == []
    assert "/v1/predict" in [t.strip() for t in seen["docs_paths"]]  # /docs rendered offline
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000
    external = [u for u in seen["requested"] if not u.startswith((url, "blob:" + url))]
    assert seen["requested"] and external == [], external  # no CDN, no external fonts
