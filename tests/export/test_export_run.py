"""Export of a trained run: the parity gate on its own validation images, int8, refusals, loading, predict."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

import imagerec
from imagerec.engine.checkpoint import load_model, save_checkpoint
from imagerec.export import api as export_api
from imagerec.export import benchmark, export_run, load_bundle
from imagerec.export.onnx import export_onnx
from imagerec.utils import ImageRecError, available_cpus


@pytest.fixture(scope="module")
def onnx_bundle(cnn_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bundles") / "cnn-onnx"
    return out, export_run(cnn_run, "onnx", out, int8=True, parity_images=256, calibration_images=300)


def test_int8_export_passes_gate_and_reports_accuracy(cnn_run: Path, onnx_bundle: tuple[Path, dict]) -> None:
    out, manifest = onnx_bundle
    fp32, int8, *optional = manifest["runtimes"]
    assert (fp32["name"], int8["name"]) == ("onnx-fp32", "onnx-int8")
    # OpenVINO variants (when installed) are tried too, and kept only when they pass their own gate.
    for entry in optional + manifest["rejected_runtimes"]:
        assert entry["engine"] == "openvino" and entry["parity"]["passed"] == (entry in optional)
        assert entry["parity"]["images"] == 256
    # fp32: the gate's figures, on the run's own 256 validation images with their labels.
    p = fp32["parity"]
    assert p["passed"] and p["split"] == "val" and p["images"] == 256 and p["labelled"]
    assert p["top1_agreement"] >= 0.995 and p["max_abs_diff"] <= 1e-3
    assert p["accuracy_before"] == p["accuracy_after"] > 0.8  # trained: well above chance (0.1)
    q = int8["parity"]
    assert q["passed"] and q["accuracy_drop_points"] <= 1.0
    assert q["accuracy_before"] == p["accuracy_before"] and 0.0 < q["accuracy_after"] <= 1.0
    assert q["accuracy_drop_points"] == pytest.approx((q["accuracy_before"] - q["accuracy_after"]) * 100, abs=1e-3)
    assert manifest["quantization"]["calibration_images"] == 300
    assert manifest["quantization"]["calibration_data"].startswith("training images (")
    timed = {r["name"]: r["images_per_s"] for r in manifest["runtimes"]}
    assert manifest["preferred_runtime"] == max(timed, key=timed.get)  # the fastest that passed
    if available_cpus() > 1:  # serve's one-thread copies: timed on one thread at batch 1 too
        single = {r["name"]: r["images_per_s_1thread"] for r in manifest["runtimes"]}
        assert manifest["preferred_runtime_1thread"] == max(single, key=single.get)
    else:
        assert "preferred_runtime_1thread" not in manifest
    # Provenance: the source run, its data fingerprint, every file hashed.
    best = json.loads((cnn_run / "best.json").read_text())
    on_disk = json.loads((out / "imagerec.json").read_text())
    assert on_disk["source"]["data_fingerprint"] == best["data"]["fingerprint"]
    assert on_disk["source"]["run_dir"] == str(cnn_run.resolve())
    assert on_disk["preprocess"] == best["preprocess"] and on_disk["format_version"] == 1
    assert set(on_disk["files"]) == {"model.onnx", "model.int8.onnx"}
    assert on_disk["export"]["opset"] >= 17 and on_disk["versions"]["onnxruntime"]


def test_bundle_predicts_like_the_run(cnn_run: Path, onnx_bundle: tuple[Path, dict], digit_pngs: list[Path],
                                      tmp_path: Path) -> None:
    ts_out = tmp_path / "cnn-ts"
    export_run(cnn_run, "torchscript", ts_out, parity_images=64)
    paths = [str(p) for p in digit_pngs]
    want = imagerec.load(str(cnn_run), precision="fp32").predict(paths, top_k=3)
    for bundle, runtime in ((onnx_bundle[0], "onnx-fp32"), (onnx_bundle[0], None), (ts_out, None)):
        predictor = imagerec.load(str(bundle), runtime=runtime, batch_size=16)
        got = predictor.predict(paths, top_k=3)
        assert [g["path"] for g in got] == paths
        assert set(got[0]) == set(want[0])  # same output dicts
        if runtime == "onnx-fp32" or bundle == ts_out:  # fp32 runtimes: the same label for every image
            assert [g["label"] for g in got] == [w["label"] for w in want]
            assert max(abs(g["score"] - w["score"]) for g, w in zip(got, want, strict=True)) < 1e-3
        else:  # the preferred runtime (may be int8): nearly every label
            same = sum(g["label"] == w["label"] for g, w in zip(got, want, strict=True))
            assert same >= len(paths) - 2
        # The same Predictor API: preprocess gives the eval uint8 tensor; unreadable files are reported.
        assert predictor.preprocess(paths[0]).dtype == torch.uint8
        bad = predictor.predict([tmp_path / "missing.png"])[0]
        assert "error" in bad


def test_cli_predict_accepts_a_bundle(onnx_bundle: tuple[Path, dict], digit_pngs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    from imagerec.cli import main

    assert main(["predict", str(onnx_bundle[0]), str(digit_pngs[0]), str(digit_pngs[1]), "--format", "json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["path"] for r in lines] == [str(digit_pngs[0]), str(digit_pngs[1])]
    assert all(r["label"] in [str(d) for d in range(10)] for r in lines)


def test_mismatched_export_is_refused_naming_images(cnn_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def export_perturbed(model: torch.nn.Module, pre, path):  # a broken exporter: weights differ from the model's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        return export_onnx(model, pre, path)

    monkeypatch.setattr(export_api, "export_onnx", export_perturbed)
    out = tmp_path / "bad"
    with pytest.raises(ImageRecError) as e:
        export_run(cnn_run, "onnx", out, parity_images=64)
    msg = str(e.value)
    assert "export refused: onnx-fp32 differs from PyTorch" in msg and "Differing images:" in msg
    assert re.search(r"Differing images: train\[\d+\]", msg)  # validation images, named by their source (IDX key[index])
    assert "No bundle was written" in msg
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no staging folder left behind either


def test_int8_refused_when_accuracy_drop_too_large(cnn_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imagerec.export import api

    real = api.compare

    def damaged_int8(reference, probs, images, precision, *args, **kwargs):  # noqa: ANN001, ANN202
        # a quantization that wrecked the model: every int8 answer moves to the next class
        return real(reference, probs.roll(1, dims=1) if precision == "int8" else probs, images, precision, *args, **kwargs)

    monkeypatch.setattr(api, "compare", damaged_int8)
    out = tmp_path / "q"
    with pytest.raises(ImageRecError, match=r"onnx-int8 .*accuracy .* drop of .*allowed: 0"):
        export_run(cnn_run, "onnx", out, int8=True, parity_images=32, calibration_images=32, max_drop=0.0)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_tampered_bundle_is_refused(onnx_bundle: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(onnx_bundle[0], copy)
    load_bundle(copy)  # intact: loads
    data = bytearray((copy / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(ImageRecError, match=r"model\.int8\.onnx has been modified or damaged"):
        load_bundle(copy)
    with pytest.raises(ImageRecError, match=r"model\.int8\.onnx"):
        imagerec.load(str(copy))
    (copy / "model.int8.onnx").unlink()
    with pytest.raises(ImageRecError, match=r"model\.int8\.onnx is missing"):
        load_bundle(copy)


def test_export_argument_errors(cnn_run: Path, onnx_bundle: tuple[Path, dict], tmp_path: Path) -> None:
    with pytest.raises(ImageRecError, match="unknown export format 'tflite'"):
        export_run(cnn_run, "tflite", tmp_path / "x", parity_images=8)
    with pytest.raises(ImageRecError, match="int8 .* use format onnx"):
        export_run(cnn_run, "torchscript", tmp_path / "x", int8=True, parity_images=8)
    with pytest.raises(ImageRecError, match="already exists"):
        export_run(cnn_run, "onnx", onnx_bundle[0], parity_images=8)
    with pytest.raises(ImageRecError, match="runtime 'onnx-bf16'"):
        load_bundle(onnx_bundle[0]).create_runtime("onnx-bf16")


def test_benchmark_lists_every_runtime(onnx_bundle: tuple[Path, dict]) -> None:
    results = benchmark(onnx_bundle[0], batch_sizes=(1, 4), seconds=0.05)
    names = {r["runtime"] for r in results}
    assert {"torch-fp32", "onnx-fp32", "onnx-int8"} <= names
    assert {r["batch_size"] for r in results} == {1, 4}
    chosen = {r["runtime"] for r in results if r["predict_uses"]}
    assert chosen == {onnx_bundle[1]["preferred_runtime"]}
    for r in results:
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["images_per_s"] > 0
    assert all(r["passed_parity"] for r in results if r["runtime"] != "torch-bf16")


def test_benchmark_refuses_bad_arguments(onnx_bundle: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    # QA: --batch-sizes 0 ended in OpenVINO's "batch size is zero" traceback; --seconds -1 ran, rc 0.
    from imagerec.cli import main

    for sizes, seconds, why in (((0,), 1.0, "batch sizes must be whole numbers >= 1, got 0 "),
                                ((1, -4, 0), 1.0, "got -4, 0 "), ((2.5,), 1.0, "got 2.5 "), ((), 1.0, "no batch sizes given"),
                                ((1,), -1.0, "seconds must be a positive number"), ((1,), 0.0, "got 0.0 "),
                                ((1,), float("nan"), "got nan "), ((1,), float("inf"), "got inf ")):
        with pytest.raises(ImageRecError, match=re.escape(why)):
            benchmark(onnx_bundle[0], batch_sizes=sizes, seconds=seconds)
    for flags, why in ((["--batch-sizes", "0"], "got 0 (batch_sizes / --batch-sizes)"),
                       (["--seconds", "-1"], "got -1.0 (seconds / --seconds)")):
        assert main(["benchmark", str(onnx_bundle[0]), *flags]) == 2
        out = capsys.readouterr()
        assert out.err.startswith("error: ") and why in out.err and out.out == ""


def _signal_stack() -> tuple[int | None, int, int]:
    import ctypes

    from imagerec.export.runtime import _SignalStack

    st = _SignalStack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(st)) == 0
    return st.ss_sp, st.ss_size, st.ss_flags


def test_openvino_leaves_the_threads_signal_stack_as_it_was(onnx_bundle: tuple[Path, dict]) -> None:
    # openvino's compile_model swaps in a signal stack of its own and later unmaps it: left in place,
    # the next signal handled on that thread killed the whole test process with SIGSEGV. A fresh
    # thread (no signal stack yet, nothing of openvino's installed on it) shows the change.
    pytest.importorskip("openvino")
    import threading

    import numpy as np

    from imagerec.export.runtime import OpenVinoRuntime

    out, _ = onnx_bundle
    seen: dict[str, object] = {}

    def in_fresh_thread() -> None:
        seen["before"] = _signal_stack()
        rt = OpenVinoRuntime(out / "model.onnx", hint="f32")
        rt.run(np.zeros((2, 1, 28, 28), np.uint8))
        seen["after"] = _signal_stack()

    t = threading.Thread(target=in_fresh_thread)
    t.start()
    t.join()
    assert "after" in seen, "the OpenVINO runtime failed in the thread"
    assert seen["after"] == seen["before"]


def test_openvino_instances_with_fewer_threads_than_cores_are_not_pinned(onnx_bundle: tuple[Path, dict]) -> None:
    # OpenVINO pins each compiled model's threads starting from the first core: two 1-thread
    # models (serve --instances 2 on 2 cores) then shared core 0 (42 img/s in all, 89 unpinned).
    pytest.importorskip("openvino")
    from imagerec.export.runtime import OpenVinoRuntime
    from imagerec.utils import available_cpus

    out, _ = onnx_bundle
    if available_cpus() < 2:
        pytest.skip("needs 2 or more cores for a 1-thread instance to be fewer than the cores")
    single = OpenVinoRuntime(out / "model.onnx", hint="f32", threads=1)
    assert single.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert single.compiled.get_property("ENABLE_CPU_PINNING") is False
    whole = OpenVinoRuntime(out / "model.onnx", hint="f32")
    assert whole.compiled.get_property("INFERENCE_NUM_THREADS") == available_cpus()


def test_a_bundles_threads_size_its_session_not_pytorchs_process_wide_count(onnx_bundle: tuple[Path, dict]) -> None:
    # serve --instances 2 loads bundles with threads=1; PyTorch models served beside them keep
    # their threads whatever the load order.
    import torch

    from imagerec.predict import Predictor
    from imagerec.utils import available_cpus

    out, _ = onnx_bundle
    before = torch.get_num_threads()
    predictor = Predictor.from_bundle(out, runtime="onnx-fp32", threads=1)
    assert predictor.runtime.session.get_session_options().intra_op_num_threads == 1
    assert torch.get_num_threads() == before == available_cpus()


def test_one_thread_copies_use_the_runtime_fastest_on_one_thread(onnx_bundle: tuple[Path, dict]) -> None:
    from imagerec.export.bundle import preferred_runtime_entry

    manifest = json.loads((onnx_bundle[0] / "imagerec.json").read_text())
    manifest.update(preferred_runtime="onnx-fp32", preferred_runtime_1thread="onnx-int8")
    assert preferred_runtime_entry(manifest, threads=1)["name"] == "onnx-int8"
    assert preferred_runtime_entry(manifest)["name"] == preferred_runtime_entry(manifest, threads=2)["name"] == "onnx-fp32"
    del manifest["preferred_runtime_1thread"]  # a bundle exported before the one-thread timing
    assert preferred_runtime_entry(manifest, threads=1)["name"] == "onnx-fp32"
    bundle = load_bundle(onnx_bundle[0])
    want = onnx_bundle[1].get("preferred_runtime_1thread", onnx_bundle[1]["preferred_runtime"])
    assert bundle.create_runtime(threads=1).name == want
    assert bundle.create_runtime().name == onnx_bundle[1]["preferred_runtime"]


def test_bf16_runtime_is_gated_by_agreement_not_by_max_drop() -> None:
    """An fp32 export's bf16 runtime must agree image by image: an accuracy-only gate (and --max-drop,
    meant for int8) would let predictions flip as long as as many flip right as wrong."""
    from imagerec.export.parity import ImageSet, compare

    ref = torch.softmax(torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    flipped = ref.clone()
    flipped[0] = flipped[0].flip(0)  # 1 of 64 images changes its top-1 (98.4% agreement)
    images = ImageSet(torch.zeros(64, 1, 2, 2, dtype=torch.uint8), None, [f"im{i}" for i in range(64)], "synthetic")
    res = compare(ref, flipped, images, "bf16", max_drop=5.0)
    assert res["gate"] == {"min_top1_agreement": 0.995, "max_abs_diff": 0.01}
    assert not res["passed"] and res["differing"] == ["im0"]
    close = compare(ref, ref + 0.004, images, "bf16", max_drop=0.0)  # bf16 rounding: within 1e-2
    assert close["passed"] and not compare(ref, ref + 0.004, images, "fp32")["passed"]


def test_int8_is_gated_by_agreement_as_well_as_accuracy() -> None:
    """Accuracy alone passed an int8 runtime that agreed with fp32 on 78% of images (flips that
    cancelled); int8 must also agree on >= 97% (min_agreement) of images."""
    from imagerec.export.parity import ImageSet, compare, refusal_message

    ref = torch.softmax(torch.randn(100, 10, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    targets = ref.argmax(1).clone()
    flipped = ref.clone()
    flipped[:10] = flipped[:10].flip(1)  # 10 of 100 images change their top-1: 90% agreement
    targets[:5] = flipped[:5].argmax(1)  # 5 of those flips are "right", 5 "wrong": accuracy unchanged
    images = ImageSet(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), targets, [f"im{i}" for i in range(100)], "synthetic")
    res = compare(ref, flipped, images, "int8", max_drop=1.0)
    assert res["accuracy_drop_points"] == 0.0 and res["top1_agreement"] == 0.9
    assert res["gate"] == {"max_accuracy_drop_points": 1.0, "min_top1_agreement": 0.97} and not res["passed"]
    msg = refusal_message("onnx-int8", res, "run")
    assert "top-1 agreement with fp32 90.00% (needs >= 97.0%)" in msg and "--min-agreement" in msg
    assert compare(ref, flipped, images, "int8", max_drop=1.0, min_agreement=0.9)["passed"]
    assert compare(ref, ref, images, "int8", max_drop=0.0)["passed"]


def test_min_agreement_out_of_range_is_refused_before_loading(cnn_run: Path, tmp_path: Path) -> None:
    for bad in (97.0, -0.1, float("nan")):
        with pytest.raises(ImageRecError, match=r"--min-agreement .* from 0 to 1"):
            export_run(cnn_run, "onnx", tmp_path / "b", int8=True, min_agreement=bad)
    assert not (tmp_path / "b").exists()


def test_8bit_int8_bundle_falls_back_to_fp32_on_a_cpu_without_vnni(onnx_bundle: tuple[Path, dict],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """8-bit weights were gated on the exporting CPU; one without VNNI can saturate (measured -1.56
    points on AVX2), so predict/serve pick a runtime that is not int8 there, and say why once."""
    from imagerec.export import bundle as bundle_mod

    manifest = json.loads((onnx_bundle[0] / "imagerec.json").read_text())
    manifest.update(preferred_runtime="onnx-int8", preferred_runtime_1thread="onnx-int8")
    manifest["quantization"]["weights"] = "int8"
    monkeypatch.setattr(bundle_mod, "int8_may_saturate", lambda: False)
    assert bundle_mod.preferred_runtime_entry(manifest)["name"] == "onnx-int8"  # a VNNI CPU: as exported
    monkeypatch.setattr(bundle_mod, "int8_may_saturate", lambda: True)
    monkeypatch.setattr(bundle_mod, "_warned_saturation", set())
    with pytest.warns(UserWarning, match="8-bit weights on a CPU with VNNI; this CPU has none.*Export it again"):
        entry = bundle_mod.preferred_runtime_entry(manifest)
    assert entry["precision"] != "int8"
    assert bundle_mod.preferred_runtime_entry(manifest, threads=1)["precision"] != "int8"
    manifest["quantization"]["weights"] = "int7 (reduce_range: no VNNI)"  # exported on such a CPU: safe there
    assert bundle_mod.preferred_runtime_entry(manifest)["name"] == "onnx-int8"
    del manifest["quantization"]["weights"]  # bundles from before the field: 8-bit weights
    assert bundle_mod.preferred_runtime_entry(manifest)["precision"] != "int8"


def test_bundle_manifest_records_the_bf16_agreement_gate(onnx_bundle: tuple[Path, dict]) -> None:
    _, manifest = onnx_bundle
    bf16 = [e for e in manifest["runtimes"] + manifest["rejected_runtimes"] if e.get("precision") == "bf16"]
    if not bf16:
        pytest.skip("no OpenVINO bf16 runtime on this machine (no OpenVINO, or no bf16 units)")
    gate = bf16[0]["parity"]["gate"]
    assert gate == {"min_top1_agreement": 0.995, "max_abs_diff": 0.01}
    passed = bf16[0]["parity"]["top1_agreement"] >= 0.995 and bf16[0]["parity"]["max_abs_diff"] <= 0.01
    assert (bf16[0] in manifest["runtimes"]) == passed


def test_export_refuses_other_data_at_an_old_runs_relative_data_path(old_relative_run: Path, tmp_path: Path,
                                                                     write_other_digits) -> None:  # type: ignore[no-untyped-def]
    old = old_relative_run
    write_other_digits(tmp_path / "digits")  # other images at that path, from this folder
    with pytest.raises(ImageRecError, match="fingerprint differs.*Pass the data to use explicitly as DATA"):
        export_run(old, "onnx", tmp_path / "b", parity_images=8)
    assert not (tmp_path / "b").exists()



def test_bundle_keeps_the_runs_max_pixels(cnn_run: Path, tmp_path: Path, copy_run) -> None:  # type: ignore[no-untyped-def]
    """predict and serve apply a bundle's source run's pixel limit, as `imagerec eval` does the run's."""
    run = copy_run(cnn_run, tmp_path / "run", max_pixels=5000)
    manifest = export_run(run, "onnx", tmp_path / "b", parity_images=32)
    assert manifest["source"]["max_pixels"] == 5000
    assert imagerec.load(tmp_path / "b").max_pixels == 5000
    assert imagerec.load(tmp_path / "b", max_pixels=90).max_pixels == 90
    text = manifest["input"]["normalisation"]  # the order of the preprocess contract, as it runs
    assert text.index("EXIF") < text.index("resize") < text.index("centre crop") < text.index("ops")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_benchmark_of_a_run_marks_the_precision_predict_runs_it_in(cnn_run: Path, tmp_path: Path, copy_run,  # type: ignore[no-untyped-def]
                                                                     precision: str) -> None:
    # QA: a run trained with --precision fp32 was marked as predicted by torch-bf16 on a CPU with bf16
    # units (benchmark resolved "auto"); predict runs a run in its own precision (Predictor.from_run).
    run = copy_run(cnn_run, tmp_path / "run", precision=precision)
    amp = imagerec.load(run, device="cpu").amp_dtype
    chosen = {r["runtime"] for r in benchmark(run, batch_sizes=(1,), seconds=0.01) if r["predict_uses"]}
    assert chosen == {"torch-bf16" if amp == torch.bfloat16 else "torch-fp32"}


def test_benchmark_of_a_bundle_needs_only_the_bundle(cnn_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # QA: with the source run's folder still there but its checkpoints deleted, `benchmark BUNDLE`
    # failed "no checkpoint found"; a run trained again in that folder would have been timed as "torch".
    run = Path(shutil.copytree(cnn_run, tmp_path / "run"))
    export_run(run, "onnx", tmp_path / "b", parity_images=16)

    def runtimes() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="imagerec"):
            return [r["runtime"] for r in benchmark(tmp_path / "b", batch_sizes=(1,), seconds=0.01)]

    assert runtimes()[0] == "torch-fp32" and "torch" not in caplog.text  # the weights exported: timed beside it
    model, meta = load_model(run)
    save_checkpoint(run / "best", model, meta)  # the same run saved again (trained on): a new weights_id
    got = runtimes()
    assert got[0] == "onnx-fp32" and not any(name.startswith("torch") for name in got)
    assert "without PyTorch" in caplog.text and "holds other weights than the ones exported" in caplog.text
    for f in [*run.glob("*.json"), *run.glob("*.safetensors")]:
        f.unlink()  # checkpoints cleaned up after the export; the folder stays
    got = runtimes()
    assert got[0] == "onnx-fp32" and not any(name.startswith("torch") for name in got)
    assert f"{run / 'best.json'} is gone" in caplog.text


def test_int8_export_with_other_data_when_the_runs_data_has_moved(cnn_run: Path, tmp_path: Path, copy_run,  # type: ignore[no-untyped-def]
                                                                   write_other_digits,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # QA: `export --int8 --data OTHER` still read the run's (moved) training folder, and its error
    # said to pass --data, which the user had. --data's images are used for calibration then.
    run = copy_run(cnn_run, tmp_path / "run", data=str(tmp_path / "moved-away"))
    write_other_digits(tmp_path / "other")
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        manifest = export_run(run, "onnx", tmp_path / "b", int8=True, data=str(tmp_path / "other"), parity_images=8,
                              calibration_images=8, min_agreement=0.0, max_drop=100.0)
    assert [r["name"] for r in manifest["runtimes"]][:2] == ["onnx-fp32", "onnx-int8"]
    assert f"calibrating int8 on {tmp_path / 'other'} instead of the run's own training images" in caplog.text
    # and the bundle says so, not "training images"
    assert manifest["quantization"]["calibration_data"].startswith(f"{tmp_path / 'other'} (the run's own training")
    # an unreadable --data names --data, and does not tell the user to pass it
    with pytest.raises(ImageRecError, match="--data: the images to check the export with and to calibrate int8 on") as e:
        export_run(run, "onnx", tmp_path / "b2", int8=True, data=str(tmp_path / "nothing-here"), parity_images=8)
    assert "pass data=" not in str(e.value)
