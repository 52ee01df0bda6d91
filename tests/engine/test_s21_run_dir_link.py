"""Session 21: `train --out LINK` where LINK is a symbolic link to nothing says so (it said "is a
file"), in the words export-dataset uses for the same case."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from imagerec.cli import main
from imagerec.engine.run_dir import claim_run_dir, precheck_out
from imagerec.utils import ImageRecError


def test_out_that_is_a_dangling_link_is_named_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("dangl").symlink_to(tmp_path / "nowhere" / "dir")
    expected = (f"--out dangl is a symbolic link to {tmp_path / 'nowhere' / 'dir'}, which does not exist: create "
                "that folder or give another --out")
    with pytest.raises(ImageRecError) as e:
        precheck_out("dangl")
    assert str(e.value) == expected
    with contextlib.ExitStack() as held, pytest.raises(ImageRecError) as e:
        claim_run_dir("dangl", held)
    assert str(e.value) == expected
    # under the link: named too (mkdir said "dangl: File exists")
    with contextlib.ExitStack() as held, pytest.raises(ImageRecError) as e:
        claim_run_dir("dangl/run", held)
    assert str(e.value).startswith("dangl, a folder of --out dangl/run, is a symbolic link to ")
    assert not (tmp_path / "nowhere").exists()


def test_train_cli_with_a_dangling_out_link(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    link = tmp_path / "dangl"
    link.symlink_to("/nonexistent/dir")
    assert main(["train", "mnist-mini", "--model", "mlp", "--epochs", "1", "--out", str(link)]) != 0
    err = capsys.readouterr().err
    assert f"error: --out {link} is a symbolic link to /nonexistent/dir, which does not exist" in err
    assert "is a file" not in err and link.is_symlink()


def test_out_that_is_a_file_is_still_called_a_file(tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ImageRecError, match=r"is a file; give a folder for the run"):
        precheck_out(str(f))
    with contextlib.ExitStack() as held, pytest.raises(ImageRecError, match=r"is a file; give a folder for the run"):
        claim_run_dir(str(f), held)
