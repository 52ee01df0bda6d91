"""API keys: required for predict when configured; admin always needs one; CORS off by default."""

from __future__ import annotations

from conftest import KEY, auth, start_thread_server

from imagerec.serve import ServeSettings


def test_predict_key_matrix(server, digits):
    files = {"file": ("x.png", digits[0], "image/png")}
    with server.client() as c:
        none = c.post("/v1/predict", files=files)
        wrong = c.post(
            "/v1/predict",
            files=files,
            headers={"Authorization": "Bearer wrong-key-wrong-key-wrong"},
        )
        bearer = c.post("/v1/predict", files=files, headers=auth())
        x_api = c.post("/v1/predict", files=files, headers={"X-API-Key": KEY})
        second = c.post(
            "/v1/predict",
            files=files,
            headers={"X-API-Key": "second-key-abcdefghijklmnop"},
        )
        models = c.get("/v1/models")
    assert none.status_code == 401 and none.json()["error"]["type"] == "unauthorized"
    assert none.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]["message"]
    assert (
        bearer.status_code == 200
        and x_api.status_code == 200
        and second.status_code == 200
    )
    assert models.status_code == 200  # reading the model list needs no key


def test_admin_needs_a_key(server):
    with server.client() as c:
        for path, body in (
            ("/v1/admin/default", {"name": "mnist", "version": "1"}),
            ("/v1/admin/reload", {}),
            ("/v1/admin/models", {"path": "mnist"}),
        ):
            assert c.post(path, json=body).status_code == 403
            assert (
                c.post(
                    path, json=body, headers={"X-API-Key": "nope-nope-nope-nope-nope"}
                ).status_code
                == 403
            )
        assert (
            c.post(
                "/v1/admin/default",
                json={"name": "mnist", "version": "1"},
                headers=auth(),
            ).status_code
            == 200
        )


def test_without_keys_predict_is_open_admin_is_forbidden_and_cors_off(run_dir, digits):
    running = start_thread_server(ServeSettings(models=(str(run_dir),)))
    try:
        with running.client() as c:
            assert (
                c.post(
                    "/v1/predict", files={"file": ("x.png", digits[0], "image/png")}
                ).status_code
                == 200
            )
            r = c.post("/v1/admin/reload", json={}, headers=auth())
            assert (
                r.status_code == 403
                and "without API keys" in r.json()["error"]["message"]
            )
            pre = c.options(
                "/v1/predict",
                headers={
                    "Origin": "https://evil.example",
                    "Access-Control-Request-Method": "POST",
                },
            )
            assert "access-control-allow-origin" not in pre.headers
            got = c.get("/v1/models", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in got.headers
    finally:
        running.stop()


def test_cors_only_for_configured_origins(run_dir):
    running = start_thread_server(
        ServeSettings(models=(str(run_dir),), cors_origins=("https://app.example",))
    )
    try:
        with running.client() as c:
            ok = c.get("/v1/models", headers={"Origin": "https://app.example"})
            other = c.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in other.headers
    finally:
        running.stop()
