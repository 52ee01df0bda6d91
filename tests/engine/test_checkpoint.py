"""Checkpoint pairs: the weights and their metadata always come from the same save."""

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
from safetensors.torch import load_file, save_file

from imagerec.engine import checkpoint as ckpt
from imagerec.utils import ImageRecError


def _model(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(m.weight, value)
    return m


def _save_killed_between_renames(monkeypatch: pytest.MonkeyPatch, stem: Path, model: torch.nn.Module, meta: dict) -> None:
    """A save whose process dies after the weights rename and before the metadata rename."""
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(stem, model, meta)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)


def test_a_save_killed_between_its_two_files_is_read_on_load_and_finished_by_the_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stem = tmp_path / "last"
    ckpt.save_checkpoint(stem, _model(1.0), {"epoch": 1})
    _save_killed_between_renames(monkeypatch, stem, _model(2.0), {"epoch": 2})
    assert json.loads(stem.with_suffix(".json").read_text())["epoch"] == 1  # the old metadata beside new weights
    with pytest.warns(UserWarning, match="interrupted"):
        meta = ckpt.read_checkpoint_meta(stem)
    assert meta["epoch"] == 2
    assert (tmp_path / "last.json.tmp").exists()  # a reader never renames (session 21: read-only run dirs)
    weights, _ = ckpt.load_checkpoint_tensors(stem)
    assert torch.equal(weights["weight"], torch.full((2, 3), 2.0))
    assert ckpt.finish_interrupted_save(stem)  # the writer (train --resume) does
    assert not (tmp_path / "last.json.tmp").exists()
    assert json.loads(stem.with_suffix(".json").read_text())["epoch"] == 2


def test_loading_the_weights_alone_accepts_the_unfinished_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stem = tmp_path / "best"
    ckpt.save_checkpoint(stem, _model(1.0), {"epoch": 1})
    _save_killed_between_renames(monkeypatch, stem, _model(2.0), {"epoch": 2})
    with pytest.warns(UserWarning, match="interrupted"):
        weights, _ = ckpt.load_checkpoint_tensors(stem)
    assert torch.equal(weights["weight"], torch.full((2, 3), 2.0))
    assert json.loads(stem.with_suffix(".json").read_text())["epoch"] == 1  # left to the writer


def test_a_first_save_killed_between_its_two_files_is_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stem = tmp_path / "last"
    _save_killed_between_renames(monkeypatch, stem, _model(3.0), {"epoch": 1})
    assert not stem.with_suffix(".json").exists()
    with pytest.warns(UserWarning, match="interrupted"):
        assert ckpt.read_checkpoint_meta(stem)["epoch"] == 1


def test_weights_and_metadata_of_different_saves_are_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ckpt.save_checkpoint(a, _model(1.0), {"epoch": 1})
    ckpt.save_checkpoint(b, _model(2.0), {"epoch": 2})
    shutil.copy(b.with_suffix(".safetensors"), a.with_suffix(".safetensors"))
    for load in (ckpt.read_checkpoint_meta, ckpt.load_checkpoint_tensors):
        with pytest.raises(ImageRecError, match="a.safetensors and a.json come from different saves"):
            load(a)


def test_checkpoints_from_before_the_pairing_id_still_load(tmp_path: Path) -> None:
    stem = tmp_path / "old"
    ckpt.save_checkpoint(stem, _model(1.0), {"epoch": 1})
    spath, jpath = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    save_file(load_file(str(spath)), str(spath), metadata={"format": ckpt.FORMAT, "format_version": "1"})
    meta = json.loads(jpath.read_text())
    del meta["weights_id"]
    jpath.write_text(json.dumps(meta))
    assert ckpt.read_checkpoint_meta(stem)["epoch"] == 1
    assert torch.equal(ckpt.load_checkpoint_tensors(stem)[0]["weight"], torch.ones(2, 3))


def test_a_save_on_a_full_disk_names_the_file_and_keeps_the_previous_pair(tmp_path: Path) -> None:
    """QA: a file size limit (as a full disk) while saving gave a SafetensorError traceback and left
    best.json.tmp; now one ImageRecError naming the file, no temp files, the old pair loadable."""
    stem = tmp_path / "best"
    ckpt.save_checkpoint(stem, _model(1.0), {"epoch": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    script = textwrap.dedent(f"""
        import resource, signal
        import torch
        from imagerec.engine.checkpoint import save_checkpoint
        from imagerec.utils import ImageRecError
        big = torch.nn.Linear(256, 256)  # 256 KB of weights, over the limit below; its JSON is not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            save_checkpoint({str(stem)!r}, big, {{"epoch": 2}})
        except ImageRecError as e:
            print("error:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.startswith(f"error: {stem}.safetensors: cannot save the checkpoint: File too large;"), out.stdout
    assert len(out.stdout.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no .tmp left, the old pair untouched
    assert ckpt.read_checkpoint_meta(stem)["epoch"] == 1
    assert torch.equal(ckpt.load_checkpoint_tensors(stem)[0]["weight"], torch.ones(2, 3))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_weights_get_the_same_permissions_as_the_other_run_files(tmp_path: Path, umask: int) -> None:
    """safetensors writes its files 0600: the run's metadata was readable by a serving account or a
    teammate, its weights were not. Both files of a pair now follow the umask like every other file."""
    old = os.umask(umask)
    try:
        ckpt.save_checkpoint(tmp_path / "best", _model(1.0), {"model": "linear"})
    finally:
        os.umask(old)
    modes = {p.suffix: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {".safetensors": 0o666 & ~umask, ".json": 0o666 & ~umask}
