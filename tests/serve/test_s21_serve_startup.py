"""Session 21 (QA "sec" bug 5): `imagerec serve` of a damaged checkpoint ends as every other command
does, with one `error:` line naming the file and exit status 2, not two chained tracebacks from
uvicorn's lifespan handler (and exit status 3)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, untrained_run) -> Path:
    """An untrained 1-channel `mlp` run over 8 px images, written straight to a checkpoint."""
    return untrained_run(tmp_path_factory.mktemp("s21-serve") / "good", in_chans=1, img_size=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*models: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.run([sys.executable, "-m", "imagerec", "serve", *map(str, models), "--port", str(_free_port())],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _damaged(tiny_run: Path, name: str, how: str) -> Path:
    run = tiny_run.parent / name
    shutil.copytree(tiny_run, run)
    weights = run / "best.safetensors"
    if how == "truncated":
        with open(weights, "r+b") as f:
            f.truncate(100)
    else:  # a pickle put in its place
        torch.save({"w": torch.zeros(2)}, weights)
    return run


@pytest.mark.parametrize("how", ["truncated", "pickle"])
def test_a_damaged_checkpoint_is_one_error_line(tiny_run: Path, how: str) -> None:
    bad = _damaged(tiny_run, f"bad-{how}", how)
    # the good model loads first: the damaged second one still ends the start with one line
    proc = _serve(tiny_run, bad, cwd=tiny_run.parent)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}/best.safetensors: cannot read checkpoint weights ({errors[0].split('(', 1)[1]}"]
    assert errors[0].endswith("; the file is damaged or incomplete")
    assert proc.stderr.rstrip().endswith(errors[0])  # the last line: nothing after it


def test_the_same_name_and_version_twice_is_one_error_line(tiny_run: Path) -> None:
    # QA "srv" bug 4: a 40-line traceback ending in the HTTP answer's "POST /v1/admin/reload"
    proc = subprocess.run(
        [sys.executable, "-m", "imagerec", "serve", f"a@1={tiny_run}", f"a@1={tiny_run}", "--port", str(_free_port())],
        cwd=tiny_run.parent, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "admin/reload" not in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == (
        f"error: model source 'a@1={tiny_run}': model 'a' version '1' is already loaded from an earlier source on "
        "the command line; give each source its own NAME@VERSION=PATH")
