"""The web page in headless Debian chromium: upload a real MNIST digit, see the predicted label."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import start_thread_server

import imagerec
from imagerec.serve import ServeSettings

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs /usr/bin/chromium (apt-get install -y chromium)",
)
def test_page_classifies_an_uploaded_digit(run_dir, digits):
    sync_api = pytest.importorskip("playwright.sync_api")
    expected = imagerec.load(str(run_dir)).predict(digits[7], top_k=5)[0]
    running = start_thread_server(ServeSettings(models=(f"mnist@1={run_dir}",)))
    requested: list[str] = []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=str(CHROMIUM),
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 760})
                page.on("request", lambda r: requested.append(r.url))
                errors: list[str] = []
                page.on(
                    "console",
                    lambda m: errors.append(m.text) if m.type == "error" else None,
                )
                page.goto(running.url + "/")
                page.wait_for_selector("#classes .chip")
                assert page.locator("#classes .chip").count() == 10
                assert page.locator("#metrics").is_visible()
                page.set_input_files(
                    "#file-input",
                    files=[
                        {
                            "name": "mnist-test-7.png",
                            "mimeType": "image/png",
                            "buffer": digits[7],
                        }
                    ],
                )
                page.wait_for_selector("#result:not([hidden])", timeout=15_000)
                assert page.inner_text("#predicted-label") == expected["label"]
                bars = page.locator("#topk li")
                assert bars.count() == 5
                assert bars.nth(0).inner_text().startswith(expected["topk"][0]["label"])
                assert errors == []
                ARTIFACTS.mkdir(exist_ok=True)
                shot = ARTIFACTS / "serve-page.png"
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    finally:
        running.stop()
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000
    external = [
        u for u in requested if not u.startswith((running.url, "blob:" + running.url))
    ]
    assert requested and external == [], external  # no CDN, no external fonts
