"""Session 21: a bundle's warnings print as one clean line, one finite-number check for the export
arguments and the manifest, and a served bundle runs its blank warm-up image once per copy."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imagerec.config import PreprocessConfig
from imagerec.export import export_model, load_bundle, synthetic_images
from imagerec.export import runtime as runtime_mod
from imagerec.export.api import check_max_drop, check_min_agreement
from imagerec.export.bundle import BundleWarning, manifest_problems
from imagerec.models import create_model
from imagerec.serve.metrics import ServeMetrics
from imagerec.serve.registry import ModelRegistry
from imagerec.serve.settings import ServeSettings
from imagerec.utils import ImageRecError, is_finite_number


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 28x28 gray `cnn` exported to TorchScript (a few seconds)."""
    torch.manual_seed(0)
    model = create_model("cnn", num_classes=10, in_chans=1, img_size=28)
    pre = PreprocessConfig(28, 1, (0.5,), (0.25,), 28, tuple(str(i) for i in range(10)))
    out = tmp_path_factory.mktemp("s21") / "b"
    export_model(model, pre, "torchscript", out, images=synthetic_images(pre, n=4), timing_seconds=0)
    return out


def _unsealed(bundle: Path, folder: Path) -> Path:
    shutil.copytree(bundle, folder)
    manifest = json.loads((folder / "imagerec.json").read_text())
    manifest.pop("manifest_sha256")
    (folder / "imagerec.json").write_text(json.dumps(manifest, indent=2))
    return folder


# --- bug 5: the unsealed-bundle warning ------------------------------------------------------------

def test_unsealed_bundle_warns_in_one_clean_line_on_the_terminal(tiny_bundle: Path, tmp_path: Path) -> None:
    old = _unsealed(tiny_bundle, tmp_path / "old")
    code = ("import logging; logging.basicConfig(format='%(levelname)s: %(message)s'); "
            f"from imagerec.export import load_bundle; load_bundle({str(old)!r})")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err == (f"WARNING: {old / 'imagerec.json'} has no manifest_sha256 (written by an older imagerec), so edits "
                   "to it cannot be detected; export the bundle again to add one\n")


def test_unsealed_bundle_warning_is_catchable_once(tiny_bundle: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    old = _unsealed(tiny_bundle, tmp_path / "old")
    with caplog.at_level(logging.WARNING, logger="imagerec"), pytest.warns(BundleWarning, match="has no manifest_sha256") as seen:
        load_bundle(old)
        load_bundle(old)  # once per bundle and process
    assert len(seen) == 1 and issubclass(seen[0].category, UserWarning)
    assert [r.getMessage() for r in caplog.records].count(str(seen[0].message)) == 1


# --- bug 7: one finite-number check ----------------------------------------------------------------

@pytest.mark.parametrize("value, ok", [(0, True), (2.5, True), (-1e300, True), (math.nan, False), (math.inf, False),
                                       (-math.inf, False), (True, False), ("1", False), (None, False)])
def test_is_finite_number(value: object, ok: bool) -> None:
    assert is_finite_number(value) is ok


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.5, "1"])
def test_export_arguments_refuse_nan_and_inf(value: object) -> None:
    with pytest.raises(ImageRecError, match=r"^--max-drop \(max_drop\) must be a number of points >= 0"):
        check_max_drop(value)  # type: ignore[arg-type]
    with pytest.raises(ImageRecError, match=r"^--min-agreement \(min_agreement\) .*: a fraction of images"):
        check_min_agreement(value)  # type: ignore[arg-type]


def test_manifest_with_nan_or_inf_is_refused(tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "imagerec.json").read_text())
    assert manifest_problems(manifest) == []
    manifest["preprocess"]["std"] = [math.nan]
    manifest["runtimes"][0]["images_per_s"] = math.inf
    problems = manifest_problems(manifest)
    assert "preprocess.std [nan] is not a list of 1 finite numbers above 0" in problems
    assert f"runtime {manifest['runtimes'][0]['name']!r} has images_per_s inf, not a number of images per second" in problems


# --- bug 8: one warm-up per served copy ------------------------------------------------------------

def test_served_bundle_runs_one_blank_image_per_copy(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real_run = runtime_mod.TorchScriptRuntime.run

    def counting_run(self, x):  # type: ignore[no-untyped-def]
        calls.append(tuple(x.shape))
        return real_run(self, x)

    monkeypatch.setattr(runtime_mod.TorchScriptRuntime, "run", counting_run)
    registry = ModelRegistry(ServeSettings(models=(str(tiny_bundle),), instances=2, adaptive_wait=False), ServeMetrics())
    predictors = registry._load_instances(str(tiny_bundle))
    assert len(predictors) == 2
    assert calls == [(1, 1, 28, 28)] * 2  # the output check of each copy, which is also its warm-up
