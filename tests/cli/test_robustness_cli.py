"""`imagerec robustness` end to end: the real command on the session's MNIST run (`cnn_run`, tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagerec.cli import main


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imagerec.cli", *map(str, args)], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)


def test_json_prints_one_object_and_writes_it(cnn_run: Path, tmp_path: Path) -> None:
    (cnn_run / "robustness-test.json").unlink(missing_ok=True)
    proc = run_cli("robustness", cnn_run, "--limit", "40", "--corruptions", "gaussian_noise,fog", "--severities", "1,5",
                   "--eps", "0,0.3", "--seed", "3", "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1  # one JSON object on one line
    r = json.loads(proc.stdout)
    assert json.loads((cnn_run / "robustness-test.json").read_text()) == r
    assert (r["num_images"], r["seed"], r["split"], r["severities"]) == (40, 3, "test", [1, 5])
    assert list(r["corruptions"]) == ["gaussian_noise", "fog"]
    for attack in ("fgsm", "pgd"):
        acc = {row["eps"]: row["accuracy"] for row in r["attacks"][attack]}
        assert list(acc) == [0.0, 0.3]
        assert acc[0.0] == r["clean_accuracy"] >= 0.8
    assert {row["eps"]: row["accuracy"] for row in r["attacks"]["pgd"]}[0.3] <= 0.25
    assert r["corruptions"]["fog"]["accuracy"]["5"] < r["corruptions"]["fog"]["accuracy"]["1"]


def test_table_shows_each_corruption_and_attack(cnn_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["robustness", str(cnn_run), "--limit", "20", "--corruptions", "contrast,pixelate", "--severities", "2..3",
                 "--attacks", "fgsm", "--eps", "8/255"])
    out = capsys.readouterr().out
    assert code == 0
    r = json.loads((cnn_run / "robustness-test.json").read_text())
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in out.splitlines() if line.count("│") >= 3}
    for name in ("contrast", "pixelate"):
        acc = r["corruptions"][name]["accuracy"]
        assert rows[name] == [f"{acc['2']:.2%}", f"{acc['3']:.2%}", f"{r['corruptions'][name]['mean']:.2%}"], out
    assert rows["FGSM"] == [f"{r['attacks']['fgsm'][0]['accuracy']:.2%}"], out
    assert "eps 0.0314 (8/255)" in out
    assert f"clean accuracy {r['clean_accuracy']:.2%} on 20 test images" in out
    assert f"written: {cnn_run / 'robustness-test.json'}" in out


@pytest.mark.parametrize("args, fragments", [
    (["runs/never-trained"], ["model not found", "runs/never-trained"]),
    (["RUN", "--corruptions", "gausian_noise"], ["unknown corruption 'gausian_noise'", "Did you mean 'gaussian_noise'?"]),
    (["RUN", "--severities", "0..5"], ["severity 0 is out of range", "1 to 5"]),
    (["RUN", "--severities", "6"], ["severity 6 is out of range"]),
    (["RUN", "--severities", "mild"], ["--severities 'mild' is not understood", "1..5"]),
    (["RUN", "--eps=-0.1"], ["eps -0.1 is out of range", "8/255"]),
    (["RUN", "--eps", "1/0"], ["--eps '1/0' is not a number"]),
    (["RUN", "--attacks", "fgsn"], ["Did you mean 'fgsm'?"]),
])
def test_bad_input_is_one_clear_line(cnn_run: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragments: list[str]) -> None:
    code = main(["robustness", *[str(cnn_run) if a == "RUN" else a for a in args]])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_missing_run_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    proc = run_cli("robustness", "runs/never-trained", "--format", "json", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: model not found: runs/never-trained") and "Traceback" not in proc.stderr
