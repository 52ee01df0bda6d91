"""The files an evaluation writes (`eval-<split>.json`, `confusion-<split>.png`): all or nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from imagerec.engine.evaluate import write_eval_outputs
from imagerec.metrics import classification_metrics


def _metrics(seed: int, classes: int = 10) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return classification_metrics(rng.normal(size=(50, classes)).astype(np.float32), rng.integers(0, classes, 50),
                                  [str(k) for k in range(classes)])


def test_a_failed_eval_write_replaces_neither_file(tmp_path: Path) -> None:
    """QA: a full disk while writing confusion-test.png had already replaced eval-test.json with the
    new results (beside the old PNG), and the error named no file."""
    run = tmp_path / "run"
    run.mkdir()
    write_eval_outputs(run, "test", _metrics(0))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert sorted(before) == ["confusion-test.png", "eval-test.json"]
    assert len(before["eval-test.json"]) < 16 * 1024 < len(before["confusion-test.png"])
    (tmp_path / "new.json").write_text(json.dumps(_metrics(1)))
    script = textwrap.dedent(f"""
        import json, resource, signal
        from pathlib import Path
        from imagerec.engine.evaluate import write_eval_outputs
        from imagerec.utils import ImageRecError
        new = json.loads(Path({str(tmp_path / "new.json")!r}).read_text())
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))  # the JSON fits, the PNG does not
        try:
            write_eval_outputs(Path({str(run)!r}), "test", new)
        except ImageRecError as e:
            print("error:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.startswith(f"error: cannot write {run / 'confusion-test.png'}: File too large;"), out.stdout
    assert "none of eval-test.json, confusion-test.png was replaced" in out.stdout
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # neither replaced, no temp file left


def test_eval_outputs_are_written_whole(tmp_path: Path) -> None:
    m = _metrics(2, classes=3)
    write_eval_outputs(tmp_path, "val", m)
    assert json.loads((tmp_path / "eval-val.json").read_text())["confusion_matrix"] == m["confusion_matrix"]
    assert (tmp_path / "confusion-val.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion-val.png", "eval-val.json"]


def test_eval_and_predict_use_the_runs_own_precision(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """QA: `imagerec eval` of a `--precision fp32` run evaluated in bf16 (auto) on a bf16 CPU and
    overwrote eval-test.json with other numbers than training's own final evaluation."""
    import torch

    import imagerec
    from imagerec import utils
    from imagerec.engine.evaluate import evaluate_run
    from imagerec.predict import Predictor

    run = imagerec.train(data="mnist-mini", out=str(tmp_path / "r"), model="cnn", epochs=1, limit_train=600,
                         precision="fp32").run_dir
    recorded = json.loads((Path(run) / "eval-test.json").read_text())
    again = evaluate_run(run, write=False)
    assert (again["accuracy"], again["loss"], again["macro_f1"]) == (recorded["accuracy"], recorded["loss"], recorded["macro_f1"])
    assert Predictor.from_run(run).amp_dtype is None  # fp32, as trained
    assert Predictor.from_run(run, precision="bf16").amp_dtype == torch.bfloat16  # asked for
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(utils, "cpu_supports_bf16", lambda: False)
    assert utils.run_precision("bf16", cpu) == "auto" and utils.run_precision("fp16", cpu) == "auto"
    assert utils.run_precision("fp32", cpu) == "fp32" and utils.run_precision(None, cpu) == "auto"
    assert utils.run_precision("fp16", cuda) == "fp16"
    monkeypatch.setattr(utils, "cpu_supports_bf16", lambda: True)
    assert utils.run_precision("bf16", cpu) == "bf16"
