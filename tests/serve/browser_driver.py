"""Drives headless chromium with Playwright against a running server; prints what it saw as JSON.

Run in its own interpreter by test_browser.py, so the pytest process does no native work for
this test (see the note there).

    python browser_driver.py URL DIGIT.png SCREENSHOT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main(url: str, digit: Path, shot: Path) -> None:
    seen: dict = {"requested": [], "console_errors": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.on("request", lambda r: seen["requested"].append(r.url))
            page.on("console", lambda m: seen["console_errors"].append(m.text) if m.type == "error" else None)
            page.goto(url + "/")
            page.wait_for_selector("#classes .chip")
            seen["chips"] = page.locator("#classes .chip").count()
            seen["metrics_visible"] = page.locator("#metrics").is_visible()
            page.set_input_files("#file-input", files=[{"name": digit.name, "mimeType": "image/png",
                                                        "buffer": digit.read_bytes()}])
            page.wait_for_selector("#result:not([hidden])", timeout=15_000)
            seen["label"] = page.inner_text("#predicted-label")
            bars = page.locator("#topk li")
            seen["bars"] = [bars.nth(i).inner_text() for i in range(bars.count())]
            page.screenshot(path=str(shot), full_page=True)
            docs = browser.new_page()  # the API docs render from the app's own assets too
            docs.on("request", lambda r: seen["requested"].append(r.url))
            docs.on("console", lambda m: seen["console_errors"].append(m.text) if m.type == "error" else None)
            docs.goto(url + "/docs")
            docs.wait_for_selector(".opblock-summary-path", timeout=15_000)
            seen["docs_paths"] = docs.locator(".opblock-summary-path").all_inner_texts()
        finally:
            browser.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
