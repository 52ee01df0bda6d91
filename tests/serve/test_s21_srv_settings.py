"""Session 21, serve QA bugs 6 and 7: a model folder named like "exp=1" that exists is served as that
path (and one that reads two ways is refused, naming both); NAME=PATH with a missing PATH says how the
source was read; --api-key-file naming a folder says it is a folder, not "not found"."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagerec.serve.settings import ModelSource, ServeSettings
from imagerec.utils import ImageRecError


def test_an_existing_folder_with_an_equals_sign_is_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp=1").mkdir()
    assert ModelSource.parse("exp=1") == ModelSource("exp=1")
    assert ModelSource.parse("m@2=exp=1") == ModelSource("exp=1", "m", "2")
    assert ServeSettings(models=("exp=1",)).sources == (ModelSource("exp=1"),)


def test_a_source_that_reads_both_ways_is_refused_naming_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a=run1").mkdir()
    (tmp_path / "run1").mkdir()
    with pytest.raises(ImageRecError) as e:
        ModelSource.parse("a=run1")
    assert str(e.value) == (
        "model source 'a=run1' can be read two ways: as the folder a=run1, or as NAME=PATH (name 'a', path 'run1'); "
        "to serve the folder write ./a=run1 (or NAME=a=run1), to serve run1 write a=./run1")
    assert ModelSource.parse("./a=run1") == ModelSource("./a=run1")
    assert ModelSource.parse("a=./run1") == ModelSource("./run1", "a")


def test_name_equals_a_missing_path_says_how_it_was_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageRecError) as e:
        ServeSettings(models=("exp=1",))
    assert str(e.value).startswith("model not found: 1 ('exp=1' was read as NAME=PATH (name 'exp', path '1'), and "
                                   "there is no 1; nor is there a folder named exp=1)")
    ServeSettings(models=("exp=1",), loader=lambda path: None)  # a custom loader's names are its own


def test_a_folder_given_as_the_api_key_file_is_named_a_folder(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "keysdir").mkdir()
    with pytest.raises(ImageRecError) as e:
        ServeSettings(models=(str(tmp_path / "run"),), api_key_file=str(tmp_path / "keysdir"))
    assert str(e.value).startswith(f"API key file {tmp_path / 'keysdir'} is a directory, not a file")
    with pytest.raises(ImageRecError, match="API key file not found: "):
        ServeSettings(models=(str(tmp_path / "run"),), api_key_file=str(tmp_path / "missing"))
