"""`imagerec check DATA --undo MANIFEST`: DATA was ignored, so the manifest of another folder restored
files there while the user believed they were undoing DATA's quarantine. DATA must now be the folder
the manifest quarantined from (the same folder by another spelling is fine); --fix beside --undo is
refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from imagerec.cli import main
from imagerec.doctor import check_data, quarantine


def _quarantined(root: Path, q: Path) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (90, 0, 0)).save(root / c / "ok.png")
        (root / c / "bad.png").write_bytes(b"not a png")
    return quarantine(check_data(str(root)), q)


def test_undo_of_another_folders_manifest_restores_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pets, cars = tmp_path / "pets", tmp_path / "cars"
    pets_manifest = _quarantined(pets, tmp_path / "q-pets")
    _quarantined(cars, tmp_path / "q-cars")
    assert main(["check", str(cars), "--undo", str(pets_manifest)]) == 2
    err = capsys.readouterr().err
    assert f"{pets_manifest} is the quarantine manifest of {pets}, not of {cars}: nothing was restored" in err
    assert not (pets / "a" / "bad.png").exists() and not (cars / "a" / "bad.png").exists()


def test_undo_with_its_own_data_folder_restores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pets = tmp_path / "pets"
    manifest = _quarantined(pets, tmp_path / "q")
    monkeypatch.chdir(tmp_path)
    assert main(["check", f".{os.sep}pets{os.sep}", "--undo", str(manifest)]) == 0  # relative, trailing slash
    assert (pets / "a" / "bad.png").read_bytes() == b"not a png"


def test_fix_beside_undo_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pets = tmp_path / "pets"
    manifest = _quarantined(pets, tmp_path / "q")
    assert main(["check", str(pets), "--undo", str(manifest), "--fix", "quarantine", str(tmp_path / "q2")]) == 2
    assert "--fix and --undo cannot be used together" in capsys.readouterr().err
    assert not (pets / "a" / "bad.png").exists()  # nothing restored, nothing moved
