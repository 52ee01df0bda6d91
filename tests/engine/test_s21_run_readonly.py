"""`train --resume` on a read-only run folder (QA s21, sec bug 7): the error names config.yaml, not
atomic_write's hidden temp file, and says the run folder must be writable to resume it.

A read-only file system is simulated (tests need not run as root to mount one): creating a file in
the folder fails with EROFS, and so does unlinking a name there that does not exist, as Linux does
on a read-only mount (the unlink that masked the real error)."""

from __future__ import annotations

import builtins
import errno
import pathlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imagerec.utils
from imagerec.cli import main
from imagerec.engine.run import train
from imagerec.utils import ImageRecError, atomic_write


def _read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    real_open, real_unlink = builtins.open, pathlib.Path.unlink

    def erofs(name: object) -> OSError:
        return OSError(errno.EROFS, "Read-only file system", str(name))

    def fake_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202
        if isinstance(file, str | Path) and Path(file).parent == folder and any(c in mode for c in "wxa"):
            raise erofs(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.parent == folder:
            raise erofs(self)
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(imagerec.utils, "open", fake_open, raising=False)  # atomic_write's open
    monkeypatch.setattr(pathlib.Path, "unlink", fake_unlink)


def test_atomic_write_names_the_target_not_its_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _read_only(monkeypatch, tmp_path)
    with pytest.raises(OSError) as e, atomic_write(tmp_path / "config.yaml") as f:
        f.write("x")
    assert e.value.errno == errno.EROFS and e.value.filename == str(tmp_path / "config.yaml")


def test_atomic_write_missing_folder_names_the_target(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e, atomic_write(tmp_path / "no" / "x.json") as f:
        f.write("x")
    assert e.value.filename == str(tmp_path / "no" / "x.json")


def test_resume_of_a_read_only_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "d" / c / f"{i}.png")
    run = Path(train(data=str(tmp_path / "d"), out=str(tmp_path / "r"), model="mlp", epochs=1, batch_size=4,
                     num_threads=1, workers=0, val_fraction=0.0).run_dir)
    _read_only(monkeypatch, run)
    expected = (f"cannot write {run / 'config.yaml'}: Read-only file system; the run folder must be writable "
                "to resume it")
    with pytest.raises(ImageRecError, match="^" + expected.replace(".", r"\.")):
        train(resume=str(run), epochs=2, num_threads=1, workers=0)
    assert main(["train", "--resume", str(run), "--epochs", "2", "--num-threads", "1", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert expected in err and ".tmp" not in err and "choose another path" not in err
