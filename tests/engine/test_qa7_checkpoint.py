"""QA pass 7: a run killed between its two end-of-epoch checkpoints never loses the epoch nor gets
stuck, and a damaged checkpoint JSON is one error line, not a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from imagerec.engine.checkpoint import find_run_checkpoint, load_model, read_checkpoint_meta
from imagerec.engine.run import train
from imagerec.utils import ImageRecError

# No val split: every epoch is "best", so both checkpoints are saved at the end of every epoch.
TINY = {"data": "mnist-mini", "limit_train": 128, "batch_size": 64, "model": "mlp", "epochs": 2,
        "val_fraction": 0.0, "num_threads": 1, "augment": "none"}

# Trains TINY into argv[1] and dies like kill -9 (os._exit: no cleanup, no finally) just before the
# second checkpoint save at the end of epoch argv[2], whichever of best/last the trainer saves second.
KILLED_RUN = textwrap.dedent("""
    import os, sys
    import imagerec.engine.trainer as trainer
    from imagerec.engine.run import train

    out, epoch, saves = sys.argv[1], int(sys.argv[2]), []
    real_save = trainer.save_checkpoint

    def save(stem, model, meta, *args, **kwargs):
        state = meta["state"]
        if state["epoch"] == epoch and state["epoch_step"] == 0:
            saves.append(stem)
            if len(saves) == 2:
                os._exit(137)
        real_save(stem, model, meta, *args, **kwargs)

    trainer.save_checkpoint = save
    train(out=out, **%r)
""") % TINY


def _killed_run(tmp_path: Path, epoch: int) -> Path:
    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(run), str(epoch)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 137, proc.stderr
    return run


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The same run, never interrupted: what a killed and resumed one must end up with."""
    run = tmp_path_factory.mktemp("whole") / "run"
    return run, train(out=str(run), **TINY).metrics


def _weights(stem: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(stem.with_suffix(".safetensors"))).items() if k.startswith("model.")}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_between_the_first_two_checkpoints_resumes_that_epoch(
        tmp_path: Path, whole_run: tuple[Path, dict]) -> None:
    """QA t1 #2: killed after `best` but before `last` of epoch 1, the run could neither be resumed
    ("nothing to resume") nor trained again (--out "not empty and holds no run")."""
    run = _killed_run(tmp_path, epoch=1)
    assert read_checkpoint_meta(run / "last")["state"]["epoch"] == 1  # the finished epoch is kept
    assert find_run_checkpoint(run) == run / "last"  # predict/export use it until `best` exists
    load_model(run)

    result = train(resume=str(run))
    whole, metrics = whole_run
    assert result.metrics["epochs_run"] == 2 and result.metrics["best_epoch"] == 2
    assert result.metrics["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert _same_weights(_weights(run / "best"), _weights(whole / "best"))
    assert len((run / "history.csv").read_text().strip().splitlines()) == 3  # epochs 1 and 2, once each


def test_a_kill_between_the_checkpoints_of_a_best_epoch_saves_best_on_resume(
        tmp_path: Path, whole_run: tuple[Path, dict], caplog: pytest.LogCaptureFixture) -> None:
    """Killed between the saves at the end of epoch 2, its best epoch: `best` still holds epoch 1.
    Readers must use `last` (which holds epoch 2's weights), and --resume saves them as `best`."""
    run = _killed_run(tmp_path, epoch=2)
    last = read_checkpoint_meta(run / "last")["state"]
    assert (last["epoch"], last["best_epoch"]) == (2, 2)
    assert read_checkpoint_meta(run / "best")["state"]["epoch"] == 1  # stale
    assert find_run_checkpoint(run) == run / "last"

    with caplog.at_level("WARNING", logger="imagerec"):
        result = train(resume=str(run))  # all epochs done: only the final evaluation runs
    whole, metrics = whole_run
    assert read_checkpoint_meta(run / "best")["state"]["epoch"] == 2
    assert _same_weights(_weights(run / "best"), _weights(whole / "best"))
    assert result.metrics["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert "best was not saved after epoch 2" in caplog.text
    assert find_run_checkpoint(run) == run / "best"


def test_the_folder_of_a_run_with_best_but_no_last_can_be_trained_again(
        tmp_path: Path, whole_run: tuple[Path, dict], caplog: pytest.LogCaptureFixture) -> None:
    """A run dir left by an older imagerec (it saved `best` first) killed before its first `last`:
    config.yaml, best.* and a temp file of the interrupted `last` save. --resume says to train it
    again with the same --out, and that must be accepted (it was refused: a circle)."""
    whole, _ = whole_run
    run = tmp_path / "stuck"
    run.mkdir()
    for name in ("config.yaml", "best.json", "best.safetensors"):
        shutil.copy(whole / name, run / name)
    (run / "last.json.tmp").write_text("{")
    (run / ".train.lock").write_text("12345\n")
    old_id = read_checkpoint_meta(run / "best")["weights_id"]
    with pytest.raises(ImageRecError, match="nothing to resume; train it again with the same --out"):
        train(resume=str(run))

    with caplog.at_level("WARNING", logger="imagerec"):
        result = train(out=str(run), **{**TINY, "epochs": 1})
    assert "best.json, best.safetensors, last.json.tmp of a run that stopped before its first checkpoint" in caplog.text
    assert result.metrics["epochs_run"] == 1 and not (run / "last.json.tmp").exists()
    assert read_checkpoint_meta(run / "best")["weights_id"] != old_id

    # a folder holding anything else besides is still refused, and nothing in it is removed
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.yaml", "best.json", "best.safetensors"):
        shutil.copy(whole / name, other / name)
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ImageRecError, match="not empty and holds no run"):
        train(out=str(other), **TINY)
    assert sorted(p.name for p in other.iterdir()) == ["best.json", "best.safetensors", "config.yaml", "notes.txt"]


@pytest.mark.parametrize("name", ["best", "last"])
@pytest.mark.parametrize("content", [b"\xff", b'{"format": "imagerec-checkpoint", "x": "\xe9"}', b"[]",
                                     b'{"format": "imagerec-checkpoint", "format_version": "x"}'])
def test_a_damaged_checkpoint_json_is_one_error_naming_it(
        tmp_path: Path, whole_run: tuple[Path, dict], name: str, content: bytes) -> None:
    """QA t2 #3: non-UTF-8 bytes in best.json crashed predict/export/eval with a UnicodeDecodeError."""
    run = tmp_path / "run"
    shutil.copytree(whole_run[0], run)
    (run / f"{name}.json").write_bytes(content)
    with pytest.raises(ImageRecError, match=rf"{name}\.json: (checkpoint|not an imagerec)"):
        load_model(run, name)


def test_checkpoint_json_without_its_model_fields_is_one_error(tmp_path: Path, whole_run: tuple[Path, dict]) -> None:
    run = tmp_path / "run"
    shutil.copytree(whole_run[0], run)
    meta = json.loads((run / "best.json").read_text())
    del meta["preprocess"]
    (run / "best.json").write_text(json.dumps(meta))
    with pytest.raises(ImageRecError, match=r"best\.json: checkpoint metadata lacks .* the file is damaged"):
        load_model(run)


def test_cli_commands_name_a_non_utf8_best_json(tmp_path: Path, whole_run: tuple[Path, dict]) -> None:
    run = tmp_path / "run"
    shutil.copytree(whole_run[0], run)
    (run / "best.json").write_bytes(b"\xff")
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (28, 28)).save(image)
    for args in (["predict", str(run), str(image)], ["eval", str(run)]):
        proc = subprocess.run([sys.executable, "-m", "imagerec.cli", *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=dict(os.environ))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[-1].startswith("error: ") and f"{run}/best.json: checkpoint metadata is not UTF-8" in lines[-1], \
            proc.stderr
