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


def test_openapi_documents_what_the_server_answers(server, digits):
    """QA (schemathesis): 404/403/409/400 answers were undocumented, every 422 was documented as
    FastAPI's {"detail": [...]} though the body is {"error": ...}, /metrics as JSON though it is
    text, and no security scheme was declared. Each answer below must be a documented status of
    its operation, with the documented error shape."""
    with server.client() as c:
        spec = c.get("/openapi.json").json()
        answers = [  # (path template, method, response)
            ("/v1/predict", "post", c.post("/v1/predict", files={"file": ("x.png", digits[0], "image/png")})),  # 401
            ("/v1/predict", "post", c.post("/v1/predict", headers=auth(), files={"file": ("x.txt", b"hello", "text/plain")})),
            ("/v1/predict", "post", c.post("/v1/predict", headers=auth(), params={"top_k": 0},
                                           files={"file": ("x.png", digits[0], "image/png")})),  # 422
            ("/v1/predict", "post", c.post("/v1/predict", headers=auth(), files=[("file", ("x.png", digits[0], "image/png"))] * 9)),
            ("/v1/models/{name}/versions/{version}/predict", "post",
             c.post("/v1/models/mnist/versions/9/predict", headers=auth(), files={"file": ("x.png", digits[0], "image/png")})),
            ("/v1/models/{name}/versions/{version}", "get", c.get("/v1/models/mnist/versions/9")),
            ("/v1/admin/models", "post", c.post("/v1/admin/models", json={"path": "x", "name": "a", "version": "1"})),  # 403
            ("/v1/admin/models", "post", c.post("/v1/admin/models", headers=auth(), json={"path": ""})),
            ("/v1/admin/models", "post", c.post("/v1/admin/models", headers=auth(), json={"path": "/nonexistent/run"})),
            ("/v1/admin/default", "post", c.post("/v1/admin/default", headers=auth(), json={"name": "mnist", "version": "9"})),
        ]
        metrics = c.get("/metrics")
    assert "HTTPValidationError" not in str(spec) and "ValidationError" not in str(spec.get("components", {}))
    seen = set()
    for path, method, r in answers:
        op = spec["paths"][path][method]
        assert str(r.status_code) in op["responses"], (path, r.status_code, sorted(op["responses"]))
        doc = op["responses"][str(r.status_code)]["content"]["application/json"]["schema"]
        assert doc == {"$ref": "#/components/schemas/ErrorBody"}, (path, r.status_code, doc)
        assert set(r.json()) == {"error"} and {"type", "message"} <= set(r.json()["error"]), r.text
        seen.add(r.status_code)
    assert {400, 401, 403, 404, 413, 415, 422} <= seen, seen
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert metrics.headers["content-type"].startswith("text/plain")
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKeyHeader"}
    assert {} in spec["paths"]["/v1/predict"]["post"]["security"]  # a key only when the server has keys
    assert {} not in spec["paths"]["/v1/admin/reload"]["post"]["security"]
    files = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert files["properties"]["file"]["minItems"] == 1
