"""A served model whose scores are NaN or infinite (weights of a diverged training, a precision that
overflowed): the request gets one JSON error naming the model and what to do, counted by type, and
nothing is recorded. Before, the response with NaN in it failed to render: a bare 500 internal_error."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import httpx
from conftest import metric_value, start_thread_server
from PIL import Image

from imagerec.serve.settings import ServeSettings


def test_nan_scores_are_a_clear_error_not_a_bare_500(tmp_path: Path, nan_run: Callable[[Path], Path]) -> None:
    run = nan_run(tmp_path / "nanrun")  # classes a, b; 3x16x16
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, "PNG")
    running = start_thread_server(ServeSettings(models=(str(run),)))
    try:
        r = httpx.post(running.url + "/v1/predict", files={"file": ("leaf.png", buf.getvalue(), "image/png")})
        text = httpx.get(running.url + "/metrics").text
    finally:
        running.stop()
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "model_output_invalid"
    assert error["message"].startswith("model nanrun@1 gave NaN or infinite scores for 1 of 1 image(s) (first: image 0")
    assert "leaf.png" in error["message"] and "replace the model" in error["message"]
    assert metric_value(text, "imagerec_errors_total", type="model_output_invalid") == 1
    assert metric_value(text, "imagerec_errors_total", type="internal_error") == 0
