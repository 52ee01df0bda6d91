"""QA pass 7: damaged or mistyped bundle manifests, export counts and limits refused with one line."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import imagerec
from imagerec.cli import main
from imagerec.data import read_data
from imagerec.export import export_model, export_run, load_bundle, load_images
from imagerec.export.bundle import MANIFEST_HASH, manifest_digest
from imagerec.utils import ImageRecError

pytestmark = pytest.mark.filterwarnings("ignore:.*has no manifest_sha256")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(run, fp32 ONNX bundle, one digit PNG): a one-epoch cnn on 200 mnist-mini digits, exported once."""
    root = tmp_path_factory.mktemp("qa7")
    result = imagerec.train(data="mnist-mini", out=str(root / "run"), model="cnn", epochs=1, limit_train=200,
                            batch_size=64, augment="none")
    run = Path(result.run_dir)
    export_run(run, "onnx", root / "bundle", parity_images=16)
    digit = root / "0.png"
    Image.fromarray(read_data("mnist-mini").arrays["test"][0]).save(digit)
    return run, root / "bundle", digit


def _edited(bundle: Path, dest: Path, edit: Callable[[dict[str, Any]], None], seal: bool = True) -> Path:
    """A copy of `bundle` whose manifest `edit` changed, re-sealed (manifest_sha256 recomputed) or
    unsealed (no manifest_sha256: an older bundle, read as it is)."""
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "imagerec.json").read_text())
    edit(manifest)
    manifest.pop(MANIFEST_HASH, None)
    if seal:
        manifest[MANIFEST_HASH] = manifest_digest(manifest)
    (dest / "imagerec.json").write_text(json.dumps(manifest))
    return dest


def _one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert captured.out == ""  # nothing printed before the error (no CSV header)
    return err


def test_non_utf8_manifest_is_damage_not_a_traceback(tiny: tuple[Path, Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # QA t2 #2: bytes 0xff 0xfe crashed read_manifest with UnicodeDecodeError in predict and benchmark.
    _, bundle, digit = tiny
    copy = tmp_path / "bu"
    shutil.copytree(bundle, copy)
    (copy / "imagerec.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ImageRecError, match=r"imagerec\.json is not UTF-8 text \(byte 0xff at offset 0\); the "
                                            r"bundle is damaged: export it again"):
        load_bundle(copy)
    assert main(["predict", str(copy), str(digit)]) == 2
    _one_error_line(capsys, "imagerec.json is not UTF-8 text", "export it again")
    assert main(["benchmark", str(copy)]) == 2
    _one_error_line(capsys, "imagerec.json is not UTF-8 text", "export it again")


def _runtime_without_engine(m: dict[str, Any]) -> None:
    del m["runtimes"][0]["engine"]


def _input_size_text(m: dict[str, Any]) -> None:
    m["preprocess"]["input_size"] = "28"
    m["input"]["shape"][2:] = ["28", "28"]


def _input_size_zero(m: dict[str, Any]) -> None:
    m["preprocess"]["input_size"] = 0
    m["input"]["shape"][2:] = [0, 0]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit setting the field at `path` ("runtimes.0.parity": list items by number) to `value`."""
    def edit(m: dict[str, Any]) -> None:
        *parents, key = [int(k) if k.isdigit() else k for k in path.split(".")]
        node: Any = m
        for p in parents:
            node = node[p]
        node[key] = value
    return edit


def _file_size(m: dict[str, Any]) -> None:
    m["files"]["model.onnx"]["bytes"] = -1


def _duplicate_names(m: dict[str, Any]) -> None:
    names = ["0", "0", *m["class_names"][2:]]
    m["class_names"] = m["preprocess"]["class_names"] = names


WRONG_FIELDS = [
    (_runtime_without_engine, "runtime 'onnx-fp32' has engine None, not one of onnxruntime"),
    (_set("source", "x"), "source is not a table (got str)"),
    (_set("quantization", "x"), "quantization is not a table (got str)"),
    (_set("output", [10]), "output is not a table (got list)"),
    (_input_size_text, "preprocess.input_size '28' is not a whole number"),
    (_input_size_zero, "preprocess.input_size 0 is not a whole number of pixels of at least 1"),
    (_set("preprocess.ops", [{"op": "x"}]), "preprocess.ops [{'op': 'x'}] is not a list of op names"),
    (_set("preprocess.ops", ["blur:2"]), "preprocess.ops: unknown preprocessing op 'blur'"),
    (_set("preprocess.mean", ["0.1"]), "preprocess.mean ['0.1'] is not a list of 1 finite numbers"),
    (_set("preprocess.multi_label", "yes"), "preprocess.multi_label 'yes' is not true or false"),
    (_set("source.max_pixels", "big"), "source.max_pixels 'big' is not a whole number of at least 1"),
    (_set("format_version", 0), "format_version 0 is below 1"),
    (_set("format_version", -1), "format_version -1 is below 1"),
    (_file_size, "files['model.onnx'].bytes -1 is not a file size"),
    (_duplicate_names, "preprocess.class_names repeats [0]"),
    (_set("runtimes.0.parity", None), "runtime 'onnx-fp32' has no parity result"),
    (_set("runtimes.0.precision", 8), "runtime 'onnx-fp32' has precision 8"),
]


@pytest.mark.parametrize("seal", [True, False], ids=["resealed", "unsealed"])
def test_manifest_fields_of_the_wrong_type_are_refused_in_one_line(
        tiny: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], seal: bool) -> None:
    # QA t2 #4: each of these passed manifest_problems and crashed predict (KeyError, AttributeError,
    # TypeError, OpenVINO's RuntimeError) or was accepted silently (multi_label "yes", format_version 0).
    _, bundle, digit = tiny
    for k, (edit, why) in enumerate(WRONG_FIELDS):
        folder = _edited(bundle, tmp_path / f"b{k}", edit, seal)
        with pytest.raises(ImageRecError) as e:
            imagerec.load(folder)
        assert why in str(e.value) and "export" in str(e.value), (why, str(e.value))
    # and on the command line: one line, no traceback, nothing printed before it
    assert main(["predict", str(tmp_path / "b0"), str(digit)]) == 2
    _one_error_line(capsys, "imagerec.json contradicts itself", "export the bundle again")
    assert main(["benchmark", str(tmp_path / "b1")]) == 2
    _one_error_line(capsys, "source is not a table")


def test_class_count_is_checked_against_the_models_real_output(tiny: tuple[Path, Path, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # QA t2 #4: three class names over a 10-class model, output.classes removed and the manifest
    # re-sealed, printed the CSV header and then crashed with IndexError in Predictor._result.
    _, bundle, digit = tiny

    def three_names(m: dict[str, Any]) -> None:
        m["class_names"] = m["preprocess"]["class_names"] = ["a", "b", "c"]
        del m["output"]["classes"]

    folder = _edited(bundle, tmp_path / "three", three_names)
    # the runtime named is the machine's preferred one for model.onnx: onnx-fp32, or openvino-bf16 on AMX
    with pytest.raises(ImageRecError, match=r"(onnx|openvino)-[a-z0-9]+ \(model\.onnx\) outputs 10 scores per image but its "
                                            r"imagerec\.json names 3 classes"):
        imagerec.load(folder)
    assert main(["predict", str(folder), str(digit)]) == 2
    _one_error_line(capsys, "outputs 10 scores per image", "export the bundle again")

    def input_27(m: dict[str, Any]) -> None:  # consistent with itself, but not with the model's input
        m["preprocess"]["input_size"] = 27
        m["input"]["shape"][2:] = [27, 27]

    with pytest.raises(ImageRecError, match=r"(onnx|openvino)-[a-z0-9]+ \(model\.onnx\) does not take the input its imagerec\.json "
                                            r"describes \(uint8 1x1x27x27\)"):
        imagerec.load(_edited(bundle, tmp_path / "in27", input_27))
    assert imagerec.load(bundle).predict(str(digit))[0]["label"] in [str(d) for d in range(10)]  # intact: loads


@pytest.mark.parametrize("bad", [0, -5, "x", 2.5, True])
def test_export_image_counts_must_be_whole_numbers_of_at_least_one(tiny: tuple[Path, Path, Path], tmp_path: Path,
                                                                   bad: Any) -> None:
    # QA t2 #7 and #9: 0 and -5 silently meant every image (600 parity images, int8 calibrated on
    # all 5,400 training images); "x" was a TypeError in parity._evenly.
    run = tiny[0]
    with pytest.raises(ImageRecError, match=rf"--parity-images \(parity_images\) must be a whole number of at least "
                                            rf"1, got {bad!r}"):
        export_run(run, "onnx", tmp_path / "p", parity_images=bad)
    with pytest.raises(ImageRecError, match=rf"calibration_images must be a whole number of at least 1, got {bad!r}"):
        export_run(run, "onnx", tmp_path / "c", int8=True, calibration_images=bad)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ImageRecError, match="must be a whole number of at least 1"):
        load_images("mnist-mini", load_bundle(tiny[1]).pre, ("val",), bad)


def test_export_cli_refuses_parity_images_below_one(tiny: tuple[Path, Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    for value in ("0", "-5"):
        assert main(["export", str(tiny[0]), "--out", str(tmp_path / "x"), "--parity-images", value]) == 2
        _one_error_line(capsys, f"--parity-images (parity_images) must be a whole number of at least 1, got {value}")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad", [math.nan, -1.0, "1"])
def test_export_max_drop_is_checked_up_front(tiny: tuple[Path, Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                             bad: Any) -> None:
    # QA t2 #8: --max-drop nan ran the whole export, then refused int8 "(allowed: nan)" as if the
    # model were at fault. Up front means before the run is even loaded.
    import imagerec.export.api as export_api

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the run was loaded before max_drop was checked")

    monkeypatch.setattr(export_api, "load_model", no_loading)
    with pytest.raises(ImageRecError, match=rf"--max-drop \(max_drop\) must be a number of points >= 0, got {bad!r}"):
        export_run(tiny[0], "onnx", tmp_path / "b", int8=True, max_drop=bad)
    model = imagerec.create_model("cnn", num_classes=10, in_chans=1, img_size=28)
    with pytest.raises(ImageRecError, match=r"--max-drop \(max_drop\) must be a number"):
        export_model(model, load_bundle(tiny[1]).pre, "onnx", tmp_path / "m", int8=True, max_drop=bad)
    if isinstance(bad, float):
        assert main(["export", str(tiny[0]), "--out", str(tmp_path / "c"), "--int8", "--max-drop", str(bad)]) == 2
        _one_error_line(capsys, "--max-drop (max_drop) must be a number of points >= 0")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad", ["x", 0, -1, True, 2.5])
def test_load_refuses_a_bad_max_pixels_at_call_time(tiny: tuple[Path, Path, Path], bad: Any) -> None:
    # QA t2 #9: max_pixels="x" failed as a TypeError in the decoder at predict time, and 0 made
    # every image an error row ("exceeds the limit of 0"), which the CLI's --max-pixels refuses.
    run, bundle, _ = tiny
    for source in (run, bundle):
        with pytest.raises(ImageRecError, match=rf"max_pixels must be a whole number of at least 1, got {bad!r}"):
            imagerec.load(source, max_pixels=bad)
    assert imagerec.load(run, max_pixels=5000).max_pixels == 5000
