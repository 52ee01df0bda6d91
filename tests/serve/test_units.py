"""Pieces without a server: the batcher, settings, magic bytes, keys, prediction recording."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import start_thread_server

from imagerec.serve import ServeSettings, create_settings
from imagerec.serve.auth import ApiKeys
from imagerec.serve.batching import BatchCost, Batcher, QueueFull, adaptive_wait_ms, measure_batch_cost
from imagerec.serve.limits import sniff_image_type
from imagerec.serve.metrics import ServeMetrics
from imagerec.serve.registry import ModelRegistry
from imagerec.serve.settings import ModelSource
from imagerec.utils import ImageRecError


def test_batcher_groups_concurrent_images_and_keeps_order():
    sizes: list[int] = []

    def predict(
        x: torch.Tensor,
    ) -> torch.Tensor:  # (B, 1, 2, 2) -> (B, 1): the image's own value back
        time.sleep(0.01)
        return x.float().flatten(1)[:, :1]

    b = Batcher(
        predict,
        max_batch=8,
        max_wait_ms=20,
        capacity=64,
        on_batch=lambda n, s: sizes.append(n),
    ).start()
    futures = b.submit_many(
        [torch.full((1, 2, 2), i, dtype=torch.uint8) for i in range(20)]
    )
    assert [int(f.result(5)[0]) for f in futures] == list(range(20))
    assert sizes == [8, 8, 4]
    b.stop()
    assert not b.alive


def test_batcher_queue_is_bounded_and_all_or_nothing():
    gate = threading.Event()
    b = Batcher(
        lambda x: (gate.wait(5), x.float().flatten(1))[1],
        max_batch=1,
        max_wait_ms=0,
        capacity=3,
    ).start()
    first = b.submit_many([torch.zeros(1, 1, 1, dtype=torch.uint8)])
    time.sleep(0.05)  # the first image is now inside predict
    b.submit_many([torch.zeros(1, 1, 1, dtype=torch.uint8)] * 2)
    with pytest.raises(QueueFull):
        b.submit_many([torch.zeros(1, 1, 1, dtype=torch.uint8)] * 2)
    assert b.depth == 2
    gate.set()
    assert first[0].result(5).shape == (1,)
    b.stop()


def test_cancelled_images_are_skipped():
    calls: list[int] = []
    gate = threading.Event()

    def predict(x):
        calls.append(len(x))
        gate.wait(5)
        return x.float().flatten(1)

    b = Batcher(predict, max_batch=4, max_wait_ms=0, capacity=16).start()
    b.submit_many([torch.zeros(1, 1, 1, dtype=torch.uint8)])
    time.sleep(0.05)
    later = b.submit_many([torch.zeros(1, 1, 1, dtype=torch.uint8)] * 3)
    later[0].cancel()
    gate.set()
    assert [f.result(5).shape for f in later[1:]] == [(1,), (1,)]
    b.stop()
    assert calls == [1, 2]


def test_batcher_instances_run_batches_at_the_same_time_from_one_queue():
    """Two instances: while one is inside predict, the other takes the next batch. A 2-party
    barrier inside predict only opens if both instances are in it at once (one instance: it
    times out and every image fails)."""
    inside = threading.Barrier(2, timeout=5)
    used: list[str] = []

    def instance(name: str):
        def predict(x: torch.Tensor) -> torch.Tensor:
            used.append(name)
            inside.wait()
            return x.float().flatten(1)[:, :1]

        return predict

    b = Batcher([instance("a"), instance("b")], max_batch=1, max_wait_ms=0, capacity=16).start()
    futures = b.submit_many([torch.full((1, 1, 1), i, dtype=torch.uint8) for i in range(2)])
    assert [int(f.result(10)[0]) for f in futures] == [0, 1]
    assert sorted(set(used)) == ["a", "b"] and b.batches_run == 2
    assert b.alive
    b.stop()
    assert not b.alive


def test_batcher_instances_share_the_queue_out():
    """Ten images queued while both instances are busy: the first free instance takes half (5),
    not all 10, so the other can start on the rest as soon as it is free."""
    gate = threading.Event()
    sizes: list[int] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        gate.wait(5)
        sizes.append(len(x))
        return x.float().flatten(1)

    b = Batcher([predict, predict], max_batch=32, max_wait_ms=0, capacity=64).start()
    first = b.submit_many([torch.zeros(1, 1, 1, dtype=torch.uint8)])
    time.sleep(0.05)
    second = b.submit_many([torch.zeros(1, 1, 1, dtype=torch.uint8)])
    time.sleep(0.05)  # both instances are now inside predict
    rest = b.submit_many([torch.zeros(1, 1, 1, dtype=torch.uint8)] * 10)
    gate.set()
    for f in first + second + rest:
        f.result(5)
    b.stop()
    assert max(sizes) == 5 and sum(sizes) == 12  # never one batch of all 10


def test_one_batcher_instance_runs_one_batch_at_a_time():
    """The control for the test above: a single instance never overlaps two batches."""
    active, peak = [0], [0]
    lock = threading.Lock()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        return x.float().flatten(1)

    b = Batcher(predict, max_batch=2, max_wait_ms=0, capacity=16).start()
    for f in b.submit_many([torch.zeros(1, 1, 1, dtype=torch.uint8)] * 8):
        f.result(5)
    b.stop()
    assert peak[0] == 1


def _recording_batcher(instances: int, **kw) -> tuple[Batcher, list[int]]:
    sizes: list[int] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        sizes.append(len(x))
        return x.float().flatten(1)

    return Batcher([predict] * instances, max_batch=8, capacity=16, **kw).start(), sizes


def _image() -> list[torch.Tensor]:
    return [torch.zeros(1, 1, 1, dtype=torch.uint8)]


@pytest.mark.parametrize("informed", [True, False])
def test_informed_wait_sends_a_lone_image_at_once(informed):
    """Nothing announced: the informed batcher does not hold an image for company nobody is
    sending; the plain one holds it for the whole max wait."""
    b, sizes = _recording_batcher(1, max_wait_ms=400, wait_for_incoming_only=informed)
    start = time.perf_counter()
    b.submit_many(_image())[0].result(5)
    waited = time.perf_counter() - start
    b.stop()
    assert sizes == [1]
    assert (waited < 0.3) if informed else (waited >= 0.4)


@pytest.mark.parametrize("announced", [True, False])
def test_informed_wait_holds_an_image_for_an_announced_request(announced):
    """A request announced as on its way (decoding) is waited for, and joins the queued image's
    batch; without the announcement the queued image goes alone."""
    b, sizes = _recording_batcher(1, max_wait_ms=2000, wait_for_incoming_only=True)
    with contextlib.ExitStack() as stack:
        if announced:
            stack.enter_context(b.incoming())
        first = b.submit_many(_image())
        time.sleep(0.1)
        second = b.submit_many(_image())
    for f in first + second:
        f.result(5)
    b.stop()
    assert sizes == ([2] if announced else [1, 1])


def test_informed_wait_does_not_hold_an_image_while_another_instance_is_free():
    """Two idle instances and a request on its way: the queued image runs at once on one
    instance, the announced one later runs by itself on the other."""
    b, sizes = _recording_batcher(2, max_wait_ms=2000, wait_for_incoming_only=True)
    with b.incoming():
        b.submit_many(_image())[0].result(1.0)  # not held for the announced request
        later = b.submit_many(_image())
    later[0].result(5)
    b.stop()
    assert sizes == [1, 1]


def test_default_instances_two_for_bundles_on_two_cores_one_for_runs(tmp_path, monkeypatch):
    from imagerec.export.bundle import FORMAT, FORMAT_VERSION
    from imagerec.serve import registry

    def bundle(name: str, engine: str):
        path = tmp_path / name
        path.mkdir()
        runtimes = [{"name": f"{engine}-fp32", "engine": engine, "images_per_s": 100.0}]
        (path / "imagerec.json").write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                        "runtimes": runtimes}))
        return str(path)

    onnx, torchscript, run = bundle("onnx", "onnxruntime"), bundle("ts", "torchscript"), tmp_path / "run"
    run.mkdir()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "imagerec.json").write_text("{")
    monkeypatch.setattr(registry, "available_cpus", lambda: 2)
    assert registry.default_instances(onnx) == 2
    assert registry.default_instances(str(run)) == 1
    assert registry.default_instances(onnx, custom_loader=True) == 1
    # TorchScript threads are PyTorch's process-wide ones: two copies would each use all cores.
    assert registry.default_instances(torchscript) == 1
    assert registry.default_instances(str(damaged)) == 1  # loading it reports the damage
    monkeypatch.setattr(registry, "available_cpus", lambda: 1)
    assert registry.default_instances(onnx) == 1


def test_instances_of_a_bundle_hash_its_files_once(run_dir, tmp_path, monkeypatch):
    """Two instances of one bundle: its files are verified once, and both copies answer alike."""
    from imagerec.export import bundle as bundle_mod
    from imagerec.export import export_run
    from imagerec.serve.metrics import ServeMetrics
    from imagerec.serve.registry import ModelRegistry

    out = tmp_path / "bundle"
    export_run(run_dir, "onnx", out, parity_images=32)
    files = json.loads((out / "imagerec.json").read_text())["files"]
    hashed = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p: hashed.append(p) or real(p))
    reg = ModelRegistry(ServeSettings(models=(str(out),), instances=2), ServeMetrics())
    reg.load_startup()
    try:
        entry = reg.default()
        assert len(entry.batcher.instances) == 2
        assert len(hashed) == len(files)
        # One-thread copies run the runtime the export found fastest on one thread (2 cores here).
        manifest = json.loads((out / "imagerec.json").read_text())
        assert entry.predictor.runtime.name == manifest["preferred_runtime_1thread"]
        x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
        a, b = (fn(x) for fn in entry.batcher.instances)
        torch.testing.assert_close(a, b)
    finally:
        reg.stop_all()


def test_magic_bytes():
    assert sniff_image_type(b"\x89PNG\r\n\x1a\nrest") == "png"
    assert sniff_image_type(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff_image_type(b"RIFF\x10\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_image_type(b"RIFF\x10\x00\x00\x00WAVEfmt ") is None
    assert sniff_image_type(b"<html>") is None and sniff_image_type(b"") is None
    # PPM/PGM/PBM, which predict and the folder readers read too; TGA (no magic bytes) nowhere
    assert sniff_image_type(b"P6\n3 2\n255\n") == "ppm" and sniff_image_type(b"P1 2 2 0110") == "ppm"
    assert sniff_image_type(b"P7\n") is None and sniff_image_type(b"\x00\x00\x02\x00\x00\x00") is None


def test_ppm_upload_is_predicted_like_the_same_png(run_dir):
    import io

    import numpy as np
    from PIL import Image

    from imagerec.predict import load
    from imagerec.serve.inputs import Upload, prepare_image

    predictor = load(run_dir)
    digit = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    encoded = {}
    for fmt in ("PPM", "PNG"):
        buf = io.BytesIO()
        digit.save(buf, fmt)
        encoded[fmt] = prepare_image(predictor, Upload(0, f"d.{fmt.lower()}", buf.getvalue()), 40_000_000)
    assert encoded["PPM"].format == "ppm" and torch.equal(encoded["PPM"].tensor, encoded["PNG"].tensor)


def test_served_runs_keep_their_own_max_pixels(run_dir, tmp_path, copy_run):
    """A run's own pixel limit (its training --max-pixels, which eval and predict apply) holds when it
    is served; the server's --max-pixels caps it. Over it: 413, as for the server's own limit."""
    import io

    from PIL import Image

    from imagerec.serve.errors import ApiError
    from imagerec.serve.inputs import Upload, prepare_image

    run = copy_run(run_dir, tmp_path / "small-limit", max_pixels=500)
    registry = ModelRegistry(ServeSettings(models=(str(run),), instances=1), ServeMetrics())
    registry.load_startup()
    try:
        predictor = registry.default().predictor
        assert predictor.max_pixels == 500
        small, big = io.BytesIO(), io.BytesIO()
        Image.new("L", (20, 20), 9).save(small, "PNG")
        Image.new("L", (28, 28), 9).save(big, "PNG")  # 784 pixels
        assert prepare_image(predictor, Upload(0, "small.png", small.getvalue()), 40_000_000).width == 20
        with pytest.raises(ApiError) as e:
            prepare_image(predictor, Upload(0, "big.png", big.getvalue()), 40_000_000)
        assert (e.value.status, e.value.type) == (413, "too_many_pixels") and "exceeds the limit of 500" in e.value.message
    finally:
        registry.stop_all()
    capped = ModelRegistry(ServeSettings(models=(str(run_dir),), instances=1, max_pixels=700), ServeMetrics())
    capped.load_startup()
    try:
        assert capped.default().predictor.max_pixels == 700  # the server's lower limit caps the run's
    finally:
        capped.stop_all()


def test_settings_validation_and_sources():
    assert ModelSource.parse("digits@3=/runs/a") == ModelSource(
        "/runs/a", "digits", "3"
    )
    assert ModelSource.parse("/runs/a") == ModelSource("/runs/a")
    with pytest.raises(ImageRecError, match="max_batch"):
        ServeSettings(models=("x",), max_batch=0)
    with pytest.raises(ImageRecError, match="instances must be >= 0, got -1"):
        ServeSettings(models=("x",), instances=-1)
    with pytest.raises(ImageRecError, match="Did you mean 'max_batch'"):
        create_settings(["x"], max_bach=4)
    with pytest.raises(ImageRecError, match="API key file not found"):
        ServeSettings(models=("x",), api_key_file="/nonexistent/keys")
    with pytest.raises(ImageRecError, match="http must be 'auto' or 'h11', got 'h2'"):
        ServeSettings(models=("x",), http="h2")


def _must_not_load(path: str):
    raise AssertionError(f"a model ({path}) was loaded before the listen address was checked")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 70000}, "port must be an integer from 0 to 65535 (0: any free port), got 70000"),
        ({"port": 65536}, "got 65536"),
        ({"port": -5}, "port must be an integer from 0 to 65535 (0: any free port), got -5"),
        ({"host": " "}, "host must be an address or name"),
        ({"host": "999.1.1.1"}, "cannot listen on host '999.1.1.1': it is neither an IP address nor a name"),
    ],
)
def test_bad_listen_address_fails_before_any_model_loads(run_dir, kwargs, message):
    from imagerec.serve import serve

    with pytest.raises(ImageRecError) as info:
        serve([str(run_dir)], loader=_must_not_load, log_level="critical", **kwargs)
    assert message in str(info.value)


def _must_not_start(settings):
    raise AssertionError(f"a server was started with {settings.host}:{settings.port}")


def test_cli_names_a_bad_port_and_host(run_dir, capsys, monkeypatch):
    import imagerec.serve.app as app_mod
    from imagerec.cli import main

    monkeypatch.setattr(app_mod, "create_server", _must_not_start)

    assert main(["serve", str(run_dir), "--port", "70000"]) == 2
    assert "port must be an integer from 0 to 65535" in capsys.readouterr().err
    assert main(["serve", str(run_dir), "--host", "999.1.1.1"]) == 2
    assert "cannot listen on host '999.1.1.1'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["timeout_s", "body_timeout_s", "max_body_mb", "max_wait_ms"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_settings_are_refused(name, value):
    with pytest.raises(ImageRecError, match=f"{name} must be a finite number, got {value}"):
        ServeSettings(models=("x",), **{name: value})


def test_cli_refuses_nan_and_inf(run_dir, capsys, monkeypatch):
    import imagerec.serve.app as app_mod
    from imagerec.cli import main

    monkeypatch.setattr(app_mod, "create_server", _must_not_start)

    for flag in ("--timeout-s", "--max-body-mb", "--max-wait-ms"):
        for value in ("nan", "inf"):
            assert main(["serve", str(run_dir), flag, value]) == 2, (flag, value)
            assert "must be a finite number" in capsys.readouterr().err


def test_server_runs_the_capped_httptools_parser_and_uvloop():
    """httptools and uvloop are dependencies, so `auto` must pick them (the speed in README
    "Serving" assumes it); `h11` is uvicorn's pure-Python parser."""
    from imagerec.serve.app import create_server
    from imagerec.serve.http import CappedHttpToolsProtocol

    server = create_server(ServeSettings(models=("x",)))
    server.config.load()
    assert server.config.http_protocol_class is CappedHttpToolsProtocol
    assert server.config.loop == "auto" and importlib.util.find_spec("uvloop") is not None
    h11 = create_server(ServeSettings(models=("x",), http="h11"))
    h11.config.load()
    assert h11.config.http_protocol_class.__name__ == "JsonH11Protocol"


def test_keys_are_hashed_and_rejected_when_short(tmp_path):
    f = tmp_path / "k.txt"
    f.write_text("short\n")
    with pytest.raises(ImageRecError, match="at least 16"):
        ApiKeys(str(f))
    f.write_text("a-long-enough-key-1234\n")
    keys = ApiKeys(str(f))
    assert keys.check("a-long-enough-key-1234") and not keys.check(
        "a-long-enough-key-1235"
    )
    assert all(
        len(h) == 32 for h in keys._hashes
    )  # sha256 digests only, no plaintext kept
    assert "a-long-enough-key-1234" not in repr(vars(keys))


def test_predictions_are_recorded_through_the_hook(run_dir, digits):
    import hashlib

    import httpx

    rows: list[dict] = []
    running = start_thread_server(
        ServeSettings(models=(str(run_dir),), record_predictions=rows.extend)
    )
    try:
        r = httpx.post(
            running.url + "/v1/predict",
            files=[
                ("file", ("a.png", digits[0], "image/png")),
                ("file", ("b.png", digits[1], "image/png")),
            ],
        )
        assert r.status_code == 200
        deadline = time.monotonic() + 5
        while len(rows) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        running.stop()
    assert [row["sha256"] for row in rows] == [
        hashlib.sha256(d).hexdigest() for d in digits[:2]
    ]
    assert (
        rows[0]["label"] == r.json()["predictions"][0]["label"]
        and rows[0]["model"] == run_dir.name
    )
    assert rows[0]["request_id"] == r.json()["request_id"]


def test_recorder_keeps_rows_while_the_store_stalls_and_counts_what_it_must_drop(monkeypatch, caplog):
    """QA: with the predictions table locked for 20 s the server answered 9,277 predictions and
    recorded 1,001, silently (1,000 queued requests, then drops nobody saw). Rows now wait in one
    buffer written in large batches; past its cap they are counted in a metric and logged."""
    from prometheus_client.parser import text_string_to_metric_families

    from imagerec.serve import recording

    monkeypatch.setattr(recording, "MAX_PENDING_ROWS", 50)
    gate, written, calls = threading.Event(), [], []

    def stalled_store(rows):
        calls.append(len(rows))
        assert gate.wait(10)
        written.extend(rows)

    metrics = ServeMetrics()
    rec = recording.Recorder(ServeSettings(models=("x",), record_predictions=stalled_store), metrics)
    rec.record([{"i": 0}])
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:  # the writer has taken row 0 and is stuck in the store
        time.sleep(0.01)
    for i in range(1, 51):  # 50 requests' rows wait (the old recorder's limit was in requests, not rows)
        rec.record([{"i": i}])
    with caplog.at_level(logging.WARNING, logger="imagerec.serve"):
        rec.record([{"i": 51}, {"i": 52}])  # past the cap: dropped, counted, said
    gate.set()
    rec.close()  # writes what waits
    assert [r["i"] for r in written] == list(range(51)) and calls == [1, 50]  # the 50 in one write
    assert rec.dropped == 2 and "2 prediction(s) not recorded (2 so far): 50 rows are already waiting" in caplog.text
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["imagerec_predictions_unrecorded"].samples[0].value == 2


def test_db_records_predictions_in_the_store(run_dir, digits, tmp_path):
    import hashlib

    import httpx
    import sqlalchemy as sa

    from imagerec.store import open_store
    from imagerec.store.schema import predictions

    db = str(tmp_path / "store.db")
    running = start_thread_server(ServeSettings(models=(str(run_dir),), db=db))
    try:
        r = httpx.post(
            running.url + "/v1/predict",
            files={"file": ("a.png", digits[2], "image/png")},
        )
        assert r.status_code == 200
    finally:
        running.stop()  # the recorder is flushed on shutdown
    with open_store(db) as store, store.read() as conn:
        rows = conn.execute(
            sa.select(
                predictions.c.image_sha256, predictions.c.model_id, predictions.c.topk
            )
        ).all()
    assert [row[0] for row in rows] == [hashlib.sha256(digits[2]).hexdigest()]
    assert (
        rows[0][1] == str(run_dir) and rows[0][2] == r.json()["predictions"][0]["topk"]
    )


def test_db_without_an_importable_store_only_warns(
    run_dir, digits, caplog, monkeypatch
):
    import sys

    import httpx

    monkeypatch.setitem(
        sys.modules, "imagerec.store", None
    )  # "import imagerec.store" now raises ImportError
    with caplog.at_level(logging.WARNING, logger="imagerec.serve"):
        running = start_thread_server(
            ServeSettings(models=(str(run_dir),), db="sqlite:///unused.db")
        )
        try:
            r = httpx.post(
                running.url + "/v1/predict",
                files={"file": ("a.png", digits[0], "image/png")},
            )
            assert r.status_code == 200 and r.json()["predictions"][0]["sha256"]
        finally:
            running.stop()
    assert any("will not be recorded" in rec.getMessage() for rec in caplog.records)


def test_models_load_into_a_frozen_heap_and_retired_ones_are_freed(run_dir):
    """After a load the heap is frozen (full collections no longer walk it: p99 latency), and a
    model retired by a reload is still freed, not kept alive by the freeze or the retire timer."""
    registry = ModelRegistry(ServeSettings(models=(str(run_dir),), timeout_s=0.2), ServeMetrics())
    registry.load_startup()
    try:
        assert gc.get_freeze_count() > 10_000
        predictor = registry.default().predictor
        predictor.cycle = predictor  # freed only by a collection (an OpenVINO or ONNX graph may hold cycles)
        old = weakref.ref(predictor)
        del predictor
        registry.reload()
        assert registry.default().predictor is not old()
        deadline = time.monotonic() + 15  # retired timeout_s + 1 s after the reload
        while old() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert old() is None
    finally:
        registry.stop_all()
        gc.unfreeze()


def sleeping_model(overhead_s: float, per_image_s: float):
    """predict_batch whose batch of n takes overhead_s + n * per_image_s (sleeps: no CPU used)."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        time.sleep(overhead_s + per_image_s * len(x))
        return torch.full((len(x), 2), 0.5)

    return predict


@pytest.mark.parametrize("overhead_ms,per_image_ms", [(30, 10), (0, 15)])
def test_batch_cost_is_measured_as_overhead_plus_per_image(overhead_ms, per_image_ms):
    cost = measure_batch_cost(sleeping_model(overhead_ms / 1000, per_image_ms / 1000),
                              torch.zeros(1, 2, 2, dtype=torch.uint8), n=4)
    # Sleeps overshoot, never undershoot, and the fastest of several rounds is kept.
    assert per_image_ms - 1 <= 1000 * cost.per_image_s <= per_image_ms + 4
    assert overhead_ms - 4 <= 1000 * cost.overhead_s <= overhead_ms + 5


def test_adaptive_wait_is_the_overhead_capped_at_max_wait():
    assert adaptive_wait_ms(BatchCost(0.0060, 0.0055), 5.0) == pytest.approx(0.5)
    assert adaptive_wait_ms(BatchCost(0.0300, 0.0010), 5.0) == 5.0  # a GPU-like cost: wait the full 5 ms
    assert adaptive_wait_ms(BatchCost(0.0040, 0.0050), 5.0) == 0.0  # noise: never a negative wait


def test_server_waits_for_a_batch_only_as_long_as_batching_can_save(run_dir, digits):
    """A model whose cost is all per image: the adaptive server answers a lone request at once,
    --fixed-wait holds it for max_wait_ms; the model card says which wait is in force."""
    import httpx

    import imagerec

    def loader(path: str):
        predictor = imagerec.load(path)
        predictor.predict_batch = sleeping_model(0.0, 0.010)
        return predictor

    latencies, cards = {}, {}
    for adaptive in (True, False):
        running = start_thread_server(ServeSettings(models=(str(run_dir),), loader=loader, max_wait_ms=300,
                                                    adaptive_wait=adaptive))
        try:
            with httpx.Client(base_url=running.url, timeout=30) as c:
                cards[adaptive] = c.get("/v1/models").json()["models"][0]["batching"]
                times = []
                for i in range(3):
                    start = time.perf_counter()
                    r = c.post("/v1/predict", files={"file": ("d.png", digits[i], "image/png")})
                    times.append(time.perf_counter() - start)
                    assert r.status_code == 200, r.text
                latencies[adaptive] = min(times)
        finally:
            running.stop()
    assert cards[True]["adaptive"] and cards[True]["wait_ms"] < 5
    assert 9 <= cards[True]["measured"]["per_image_ms"] <= 14
    assert cards[False] == {"max_batch": 32, "wait_ms": 300, "max_wait_ms": 300, "adaptive": False}
    assert latencies[False] >= 0.3  # the full wait
    assert latencies[True] < 0.15


def test_server_holds_a_request_only_for_requests_on_their_way(run_dir, digits):
    """A model whose every call costs 200 ms, so batching pays and the measured wait is 200 ms:
    a lone request still goes to the model at once (no other request is on its way), while
    concurrent requests share batches."""
    import httpx

    import imagerec

    def loader(path: str):
        predictor = imagerec.load(path)
        predictor.predict_batch = sleeping_model(0.2, 0.001)
        return predictor

    def batches(c: httpx.Client) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in c.get("/metrics").text.splitlines()
                   if line.startswith("imagerec_batch_size_count"))

    running = start_thread_server(ServeSettings(models=(str(run_dir),), loader=loader, max_wait_ms=300))
    try:
        with httpx.Client(base_url=running.url, timeout=30) as c:
            assert c.get("/v1/models").json()["models"][0]["batching"]["wait_ms"] >= 150
            # A request that fails while it is on its way must not stay announced (the next lone
            # request would then wait for it).
            bad = c.post("/v1/predict", files={"file": ("d.png", b"\x89PNG\r\n\x1a\n broken", "image/png")})
            assert bad.status_code == 422, bad.text
            times = []
            for i in range(2):
                start = time.perf_counter()
                assert c.post("/v1/predict", files={"file": ("d.png", digits[i], "image/png")}).status_code == 200
                times.append(time.perf_counter() - start)
            assert min(times) < 0.35  # the 200 ms call, not the 200 ms wait on top of it
            before = batches(c)
            with ThreadPoolExecutor(6) as pool:
                codes = list(pool.map(
                    lambda i: httpx.post(running.url + "/v1/predict", timeout=30,
                                         files={"file": ("d.png", digits[i], "image/png")}).status_code,
                    range(6)))
            assert codes == [200] * 6
            assert batches(c) - before < 6  # some of the six shared a batch
    finally:
        running.stop()


def test_cli_fixed_wait_flag_reaches_the_settings(monkeypatch, run_dir):
    import imagerec.serve as serve_mod
    from imagerec.cli import main

    seen: list[dict] = []
    monkeypatch.setattr(serve_mod, "serve", lambda models, **kw: seen.append(kw))
    assert main(["serve", str(run_dir), "--max-wait-ms", "7"]) == 0
    assert main(["serve", str(run_dir), "--fixed-wait"]) == 0
    assert [(kw["max_wait_ms"], kw["adaptive_wait"]) for kw in seen] == [(7.0, True), (5.0, False)]


def test_model_card_names_local_data_by_its_last_part_only(run_dir, tmp_path, copy_run):
    """QA: `GET /v1/models` (no key needed) showed the server's absolute data path from the run's
    config, though the card holds no server paths."""
    from imagerec.serve.entries import public_data_name

    run = copy_run(run_dir, tmp_path / "r", data="/srv/secret/photos")
    registry = ModelRegistry(ServeSettings(models=(str(run),), instances=1), ServeMetrics())
    registry.load_startup()
    try:
        card = registry.default().card()
    finally:
        registry.stop_all()
    assert card["train"]["data"] == "photos" and "/srv" not in json.dumps(card)
    assert public_data_name("mnist-mini") == "mnist-mini" and public_data_name("store:pets") == "store:pets"
    assert public_data_name("C:\\data\\cats\\") == "cats" and public_data_name("runs/x/") == "x"


def test_a_version_replaced_in_place_is_not_loaded_again_under_its_name(run_dir, tmp_path):
    """--workers repeats an admin load in every worker (and in a replacement worker, later): a folder
    retrained or re-exported in place since would give that worker other weights under the same
    name@version. The action carries the weights the first worker loaded; others are refused."""
    import shutil

    from imagerec.engine.checkpoint import load_model, save_checkpoint
    from imagerec.serve.admin import admin_actions
    from imagerec.serve.errors import ApiError

    run_dir_b = tmp_path / "b"  # the same run saved again: other weights_id
    shutil.copytree(run_dir, run_dir_b)
    model, meta = load_model(run_dir)
    save_checkpoint(run_dir_b / "best", model, {k: v for k, v in meta.items() if k != "weights_id"})
    registry = ModelRegistry(ServeSettings(models=(str(run_dir),), instances=1), ServeMetrics())
    registry.load_startup()
    try:
        apply = admin_actions(registry, ApiKeys(None))
        action = {"op": "load", "path": str(run_dir_b), "given": "b", "name": "b", "version": "1", "make_default": False}
        _, repeat = apply(action)
        first = registry.get("b", "1").weights
        assert first and repeat["weights"] == first
        assert first == json.loads((run_dir_b / "best.json").read_text())["weights_id"]
        other = ModelRegistry(ServeSettings(models=(str(run_dir),), instances=1), ServeMetrics())
        other.load_startup()
        try:  # the same action repeated where the folder now holds run_dir's weights
            changed = {**repeat, "path": str(run_dir)}
            with pytest.raises(ApiError) as refused:
                admin_actions(other, ApiKeys(None))(changed)
            assert refused.value.status == 409 and refused.value.type == "model_changed"
            assert [e.key for e in other.entries()] == [(run_dir.name, "1")]  # nothing was added
            admin_actions(other, ApiKeys(None))({**repeat})  # the same weights: loaded
            assert other.get("b", "1").weights == first
        finally:
            other.stop_all()
    finally:
        registry.stop_all()
