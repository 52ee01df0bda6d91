"""A model whose outputs are NaN (weights of a diverged training) gets one clear error from eval and
robustness, not a ValueError traceback (eval) or an accuracy made of argmax-of-NaN (robustness)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from imagerec.engine.evaluate import evaluate_run
from imagerec.robustness import evaluate_robustness
from imagerec.utils import ImageRecError


@pytest.fixture
def nan_run_and_data(tmp_path: Path, nan_run: Callable[[Path], Path]) -> tuple[Path, Path]:
    run = nan_run(tmp_path / "run")  # classes a, b; 3x16x16
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (16, 16), (100 * k, 50, 200 if label == "a" else 0)).save(tmp_path / "data" / label / f"{k}.png")
    return run, tmp_path / "data"


def test_eval_of_a_nan_model_says_so(nan_run_and_data: tuple[Path, Path]) -> None:
    run, data = nan_run_and_data
    with pytest.raises(ImageRecError, match=r"outputs on 4 of 4 'all' images are NaN or infinite, in fp32"):
        evaluate_run(run, str(data), precision="fp32", write=False)


def test_robustness_of_a_nan_model_says_so(nan_run_and_data: tuple[Path, Path]) -> None:
    run, data = nan_run_and_data
    with pytest.raises(ImageRecError, match=r"outputs on 4 of 4 'all' images are NaN or infinite"):
        evaluate_robustness(run, str(data), corruptions=["fog"], severities=[1], attacks=["fgsm"], write=False)
    assert not (run / "robustness-all.json").exists()


def test_predict_with_a_nan_model_gives_error_rows_not_nan_scores(
    nan_run_and_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from imagerec.predict_run import run_predict

    run, data = nan_run_and_data
    assert run_predict(str(run), [str(data / "a")], fmt="json") == 1  # nothing predicted
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))
            for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all("NaN or infinite" in r["error"] and "score" not in r for r in rows)
