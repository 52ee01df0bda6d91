"""Session 21: a checkpoint save killed between its two renames is read where it is by every reader
(predict, eval, export, serve, the Python API), which never rename anything: the run folder may be
read-only, and a reader's rename during a live run's save made the trainer's own second rename fail.
Only the writer (train --resume, or the next save) finishes it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from imagerec.engine import checkpoint as ckpt
from imagerec.engine.run import train
from imagerec.engine.run_dir import lock_for_resume
from imagerec.utils import ImageRecError

TINY = {"data": "mnist-mini", "limit_train": 128, "batch_size": 64, "model": "mlp", "epochs": 1,
        "val_fraction": 0.0, "num_threads": 1, "augment": "none"}
NEW_ID = "f" * 32
pytestmark = pytest.mark.filterwarnings("ignore::imagerec.engine.checkpoint.CheckpointWarning")


def _model(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(m.weight, value)
    return m


def _interrupt(stem: Path) -> None:
    """What a save of `stem` killed between its two renames leaves: new weights (here: the same
    tensors under a new weights_id) beside the old metadata, the new metadata in `<stem>.json.tmp`."""
    spath, jpath = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    with safe_open(str(spath), framework="pt") as f:
        header = dict(f.metadata() or {})
    save_file(load_file(str(spath)), str(spath), metadata={**header, "weights_id": NEW_ID})
    meta = json.loads(jpath.read_text())
    meta["weights_id"], meta["marker"] = NEW_ID, "pending"
    Path(f"{jpath}.tmp").write_text(json.dumps(meta))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ro") / "run"
    train(out=str(run), **TINY)
    return run


@pytest.fixture
def half_run(tiny_run: Path, tmp_path: Path) -> Path:
    import shutil

    run = tmp_path / "half"
    shutil.copytree(tiny_run, run)
    (run / ".train.lock").unlink(missing_ok=True)
    _interrupt(run / "last")
    _interrupt(run / "best")
    return run


def test_readers_use_the_pending_metadata_and_leave_every_file_as_it_was(
        half_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _files(half_run)

    def read_only(src, dst, *args, **kwargs):  # a read-only run folder (root ignores chmod)
        raise PermissionError(errno.EROFS, "Read-only file system", str(src))

    monkeypatch.setattr(os, "replace", read_only)
    assert ckpt.has_checkpoint(half_run / "last") and ckpt.has_checkpoint(half_run / "best")
    stem = ckpt.find_run_checkpoint(half_run)
    meta = ckpt.read_checkpoint_meta(stem)
    assert meta["weights_id"] == NEW_ID and meta["marker"] == "pending"
    model, loaded = ckpt.load_model(half_run)
    assert loaded["weights_id"] == NEW_ID and isinstance(model, torch.nn.Module)
    ckpt.load_checkpoint_tensors(half_run / "last")
    assert _files(half_run) == before  # byte for byte: the temp files are still there, nothing renamed
    assert (half_run / "last.json.tmp").is_file() and (half_run / "best.json.tmp").is_file()


def test_predict_on_a_read_only_run_with_an_interrupted_save_works_and_warns_in_one_line(
        half_run: Path, tmp_path: Path) -> None:
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28), 200).save(image)
    before = _files(half_run)
    script = textwrap.dedent("""
        import errno, os, sys
        def read_only(src, dst, *a, **k):
            raise PermissionError(errno.EROFS, "Read-only file system", str(src))
        os.replace = read_only
        from imagerec.cli import main
        sys.exit(main(["predict", sys.argv[1], sys.argv[2]]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(half_run), str(image)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(image))
    warning = (f"WARNING: {half_run}/best: its last save was interrupted between its two files; using the "
               "metadata in best.json.tmp (train --resume finishes that save)")
    assert warning in proc.stderr.splitlines()
    assert "UserWarning" not in proc.stderr and "Read-only" not in proc.stderr and "warnings.warn" not in proc.stderr
    assert proc.stderr.count(f"{half_run}/best: its last save was interrupted") == 1  # once, however often it is read
    assert _files(half_run) == before


def test_a_reader_between_the_trainers_two_renames_does_not_break_its_save(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stem = tmp_path / "last"
    ckpt.save_checkpoint(stem, _model(1.0), {"epoch": 1})
    real_replace, renames, seen = os.replace, [], []

    def replace(src, dst):
        renames.append(Path(dst).name)
        real_replace(src, dst)
        if len(renames) == 1:  # an eval or serve of the live run, between the trainer's two renames
            seen.append(ckpt.read_checkpoint_meta(stem)["epoch"])
            seen.append(float(ckpt.load_checkpoint_tensors(stem)[0]["weight"][0, 0]))

    monkeypatch.setattr(os, "replace", replace)
    ckpt.save_checkpoint(stem, _model(2.0), {"epoch": 2})  # raised FileNotFoundError: the reader took its temp file
    monkeypatch.setattr(os, "replace", real_replace)
    assert renames == ["last.safetensors", "last.json"] and seen == [2, 2.0]
    assert json.loads(stem.with_suffix(".json").read_text())["epoch"] == 2
    assert not Path(f"{stem}.json.tmp").exists()


def test_the_next_save_finishes_an_interrupted_one_before_replacing_its_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # killed between its renames, then the next save fails (a full disk) before its first rename:
    # the interrupted save must have been finished first, or its metadata would be gone with the temp file
    stem = tmp_path / "last"
    ckpt.save_checkpoint(stem, _model(1.0), {"epoch": 1})
    _interrupt(stem)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(ImageRecError, match="No space left on device"):
        ckpt.save_checkpoint(stem, _model(3.0), {"epoch": 3})
    meta = ckpt.read_checkpoint_meta(stem)
    assert meta["weights_id"] == NEW_ID and meta["marker"] == "pending"
    assert json.loads(stem.with_suffix(".json").read_text())["weights_id"] == NEW_ID
    assert not Path(f"{stem}.json.tmp").exists()


def test_resume_finishes_the_interrupted_saves_under_its_lock(half_run: Path) -> None:
    saved = ckpt.read_checkpoint_meta(half_run / "last")
    with contextlib.ExitStack() as held:
        lock_for_resume(half_run, saved, held)
        for name in ("last", "best"):
            assert not (half_run / f"{name}.json.tmp").exists()
            assert json.loads((half_run / f"{name}.json").read_text())["weights_id"] == NEW_ID
    assert ckpt.finish_interrupted_save(half_run / "last") is False  # nothing left to finish


def test_train_resume_of_a_run_with_an_interrupted_save_trains_on(half_run: Path) -> None:
    result = train(resume=str(half_run), epochs=2)
    assert result.metrics["epochs_run"] == 2
    assert not (half_run / "last.json.tmp").exists() and not (half_run / "best.json.tmp").exists()
    assert ckpt.read_checkpoint_meta(half_run / "last")["state"]["epoch"] == 2
