"""The web page in headless Debian chromium: upload a real MNIST digit, see the predicted label."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import start_thread_server

import imagerec
from imagerec.serve import ServeSettings

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DRIVER = Path(__file__).resolve().parent / "browser_driver.py"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_page_classifies_an_uploaded_digit(run_dir, digits, tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api")
    expected = imagerec.load(str(run_dir)).predict(digits[7], top_k=5)[0]
    digit = tmp_path / "mnist-test-7.png"
    digit.write_bytes(digits[7])
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve-page.png"
    shot.unlink(missing_ok=True)
    running = start_thread_server(ServeSettings(models=(f"mnist@1={run_dir}",)))
    try:
        proc = subprocess.run([sys.executable, str(DRIVER), running.url, str(digit), str(shot)],
                              capture_output=True, text=True, timeout=120)
    finally:
        running.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["chips"] == 10 and seen["metrics_visible"]
    assert seen["label"] == expected["label"]
    assert len(seen["bars"]) == 5 and seen["bars"][0].startswith(expected["topk"][0]["label"])
    assert seen["console_errors"] == []
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000
    external = [u for u in seen["requested"] if not u.startswith((running.url, "blob:" + running.url))]
    assert seen["requested"] and external == [], external  # no CDN, no external fonts
