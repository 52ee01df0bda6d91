"""API keys: required for predict when configured; admin always needs one; CORS off by default."""

from __future__ import annotations

from conftest import KEY, auth, start_thread_server

from imagerec.serve import ServeSettings
from imagerec.serve.auth import ApiKeys


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


def test_key_file_with_a_bom_and_non_ascii_keys(run_dir, digits, tmp_path):
    """A key file saved by a Windows editor (UTF-8 with a BOM) and keys with non-ASCII characters,
    sent as UTF-8 bytes in either header. 'Å' ends in the byte 0x85 and 'à' in 0xa0, which
    str.strip() would take for whitespace."""
    first, umlaut, tail = "first-key-0123456789abcdef", "schlüssel-für-die-küche-2024", "clé-secrète-voilà-Å"
    path = tmp_path / "keys.txt"
    path.write_bytes(("\ufeff" + "\n".join([first, umlaut, tail]) + "\n").encode("utf-8"))
    running = start_thread_server(ServeSettings(models=(str(run_dir),), api_key_file=str(path)))
    files = {"file": ("x.png", digits[0], "image/png")}
    try:
        with running.client() as c:
            for key in (first, umlaut, tail):
                raw = key.encode("utf-8")
                assert c.post("/v1/predict", files=files, headers={"X-API-Key": raw}).status_code == 200, key
                bearer = {"Authorization": b"Bearer " + raw}
                assert c.post("/v1/predict", files=files, headers=bearer).status_code == 200, key
                assert c.post("/v1/admin/default", json={"name": "mnist", "version": "1"},
                              headers=bearer).status_code == 200, key
            wrong = c.post("/v1/predict", files=files, headers={"X-API-Key": tail.encode("latin-1")})
            assert wrong.status_code == 401  # the same text in another encoding is another key
    finally:
        running.stop()


def test_a_bom_before_a_comment_leaves_it_a_comment(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_bytes("\ufeff# keys for the staging server\nonly-key-0123456789abcdef\n".encode())
    keys = ApiKeys(str(path))
    assert keys.reload() == 1
    assert keys.check("only-key-0123456789abcdef")
    assert not keys.check("\ufeff# keys for the staging server")


def test_early_errors_carry_cors_headers(run_dir, digits):
    """The body limit answers before routing (413 by Content-Length, and while streaming): a
    browser on an allowed origin must still be able to read those answers."""
    origin = "https://app.example"
    running = start_thread_server(
        ServeSettings(models=(str(run_dir),), cors_origins=(origin,), max_body_mb=1)
    )
    try:
        with running.client(headers={"Origin": origin}) as c:
            big = c.post("/v1/predict", files={"file": ("big.png", digits[0] + b"\0" * 2**21, "image/png")})
            assert big.status_code == 413 and big.json()["error"]["type"] == "body_too_large"
            assert big.headers["access-control-allow-origin"] == origin

            def chunks():  # no Content-Length: stopped while streaming
                for _ in range(30):
                    yield b"x" * 100_000

            streamed = c.post("/v1/predict", content=chunks(), headers={"Content-Type": "application/json"})
            assert streamed.status_code == 413
            assert streamed.headers["access-control-allow-origin"] == origin
            ok = c.post("/v1/predict", files={"file": ("x.png", digits[0], "image/png")})
            assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == origin
    finally:
        running.stop()
