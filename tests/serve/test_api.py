"""Endpoints against a real uvicorn server: predictions equal Predictor.predict, models, health, page."""

from __future__ import annotations

import base64
import hashlib
import re

from conftest import auth, metric_value

import imagerec


def test_health_ready_and_docs(server):
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["default"] == {
            "name": "mnist",
            "version": "1",
        }
        docs = c.get("/docs")
        assert docs.status_code == 200 and "cdn" not in docs.text.lower()
        for asset in ("/docs-static/swagger-ui-bundle.js", "/docs-static/swagger-ui.css"):
            assert asset in docs.text and c.get(asset).status_code == 200  # served by the app, no CDN
        spec = c.get("/openapi.json").json()
        assert (
            "multipart/form-data"
            in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
        )


def test_models_card_has_classes_preprocessing_and_metrics(server, run_dir):
    with server.client() as c:
        body = c.get("/v1/models").json()
    assert body["default"] == {"name": "mnist", "version": "1"}
    cards = {(m["name"], m["version"]): m for m in body["models"]}
    assert set(cards) == {("mnist", "1"), ("mnist", "2")}
    card = cards["mnist", "1"]
    assert card["default"] is True and cards["mnist", "2"]["default"] is False
    assert card["classes"] == [str(i) for i in range(10)]
    assert (
        card["preprocessing"]["input_size"] == 28
        and card["preprocessing"]["channels"] == 1
    )
    import json

    saved = json.loads((run_dir / "metrics.json").read_text())
    assert card["metrics"]["test"]["accuracy"] == saved["test"]["accuracy"]
    assert card["metrics"]["val"]["accuracy"] == saved["val"]["accuracy"]
    assert "per_class" not in card["metrics"]["test"]
    assert str(run_dir) not in json.dumps(body)  # no server paths leak to clients


def test_multipart_and_json_predictions_equal_the_predictor(server, run_dir, digits):
    expected = imagerec.load(str(run_dir)).predict(digits[:6], top_k=3)
    files = [("file", (f"d{i}.png", d, "image/png")) for i, d in enumerate(digits[:6])]
    with server.client(headers=auth()) as c:
        multi = c.post("/v1/predict", params={"top_k": 3}, files=files)
        js = c.post(
            "/v1/predict",
            params={"top_k": 3},
            json={"images": [base64.b64encode(d).decode() for d in digits[:6]]},
        )
    assert multi.status_code == 200 and js.status_code == 200
    assert multi.headers["x-model-version"] == "mnist@1"
    for resp in (multi.json(), js.json()):
        assert resp["model"] == "mnist" and resp["version"] == "1"
        for i, (got, want) in enumerate(
            zip(resp["predictions"], expected, strict=True)
        ):
            assert got["index"] == i
            assert got["label"] == want["label"]
            assert [t["label"] for t in got["topk"]] == [
                t["label"] for t in want["topk"]
            ]
            assert all(
                abs(a["score"] - b["score"]) < 1e-5
                for a, b in zip(got["topk"], want["topk"], strict=True)
            )
            assert got["sha256"] == hashlib.sha256(digits[i]).hexdigest()
            assert (got["width"], got["height"], got["format"]) == (28, 28, "png")
    assert [p["name"] for p in multi.json()["predictions"]] == [
        f"d{i}.png" for i in range(6)
    ]


def test_versioned_predict_and_unknown_version(server, digits):
    with server.client(headers=auth()) as c:
        ok = c.post(
            "/v1/models/mnist/versions/2/predict",
            files={"file": ("x.png", digits[0], "image/png")},
        )
        missing = c.post(
            "/v1/models/mnist/versions/9/predict",
            files={"file": ("x.png", digits[0], "image/png")},
        )
    assert ok.status_code == 200 and ok.json()["version"] == "2"
    assert (
        missing.status_code == 404
        and missing.json()["error"]["type"] == "model_not_found"
    )
    assert "mnist@1" in missing.json()["error"]["message"]


def test_metrics_exposition(server, digits):
    with server.client(headers=auth()) as c:
        c.post("/v1/predict", files={"file": ("x.png", digits[1], "image/png")})
        c.post("/v1/predict", files={"file": ("x.png", b"not an image", "image/png")})
        text = c.get("/metrics").text
    assert (
        metric_value(text, "imagerec_requests_total", route="/v1/predict", status="200")
        >= 1
    )
    assert (
        metric_value(text, "imagerec_requests_total", route="/v1/predict", status="415")
        >= 1
    )
    assert (
        metric_value(text, "imagerec_errors_total", type="unsupported_media_type") >= 1
    )
    assert metric_value(text, "imagerec_batch_size_count", model="mnist@1") >= 1
    assert (
        metric_value(
            text, "imagerec_request_latency_seconds_count", route="/v1/predict"
        )
        >= 2
    )
    assert "imagerec_queue_depth" in text


def test_page_and_assets_come_from_the_server(server):
    with server.client() as c:
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        html = page.text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert "/static/app.js" in assets and "/static/style.css" in assets
        for asset in ("/static/app.js", "/static/style.css"):
            r = c.get(asset)
            assert r.status_code == 200 and len(r.content) > 500
            assert not re.search(r"https?://", r.text), (
                f"{asset} refers to an external URL"
            )
    assert not any(a.startswith(("http:", "https:", "//")) for a in assets)


def test_head_on_health_ready_and_metrics(server):
    """Load balancers and uptime checks probe with HEAD: the GET answer's status and headers, no body."""
    with server.client() as c:
        for path in ("/healthz", "/readyz", "/metrics"):
            got, head = c.get(path), c.head(path)
            assert head.status_code == 200, (path, head.text)
            assert head.content == b""
            assert head.headers["content-type"] == got.headers["content-type"]
        assert c.head("/v1/predict").status_code == 405  # not on every route
