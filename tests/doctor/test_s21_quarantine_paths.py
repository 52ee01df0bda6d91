"""Session 21: `check --undo` trusts no path of the manifest: it moves files only from inside the
quarantine folder that holds the manifest, and only to places inside the data folder it names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from imagerec.doctor import check_data, quarantine, undo_quarantine
from imagerec.utils import ImageRecError


def _quarantined(tmp_path: Path) -> tuple[Path, Path, dict]:
    """data/{a,b,c}/ with two good PNGs and one broken 'bad.png' each, the broken ones quarantined."""
    data = tmp_path / "data"
    for c in ("a", "b", "c"):
        (data / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(data / c / f"{i}.png")
        (data / c / "bad.png").write_bytes(f"not a png {c}".encode())
    manifest = quarantine(check_data(str(data), workers=1), tmp_path / "q")
    state = json.loads(manifest.read_text())
    assert [Path(m["src"]).parent.name for m in state["moves"]] == ["a", "b", "c"]
    return data.resolve(), manifest, state


def _edit(manifest: Path, state: dict, n: int, **paths: str) -> None:
    state["moves"][n].update(paths)
    manifest.write_text(json.dumps(state))


@pytest.mark.parametrize("where", ["outside", "dotdot", "symlinked_parent"])
def test_an_original_path_outside_the_data_folder_is_not_written(tmp_path: Path, where: str) -> None:
    data, manifest, state = _quarantined(tmp_path)
    planted = tmp_path / "planted"
    if where == "outside":
        src = str(planted / ".bashrc")
    elif where == "dotdot":
        src = f"{data}/a/../../planted/.bashrc"
    else:  # a class folder inside the data folder that leads elsewhere
        planted.mkdir()
        (data / "evil").symlink_to(planted, target_is_directory=True)
        src = str(data / "evil" / ".bashrc")
    _edit(manifest, state, 0, src=src)
    res = undo_quarantine(manifest)
    assert not (planted / ".bashrc").exists()
    assert sorted(res.restored) == [str(data / "b" / "bad.png"), str(data / "c" / "bad.png")]  # the others still are
    assert [p for p, _ in res.skipped] == [src]
    reason = res.skipped[0][1]
    assert reason.startswith("manifest entry 1: ")
    expected = ("(through a symbolic link), outside the data folder" if where == "symlinked_parent"
                else "is not inside the data folder")
    assert f"{expected} {data}" in reason and reason.endswith("undo restores files only there")
    assert (tmp_path / "q" / "a" / "bad.png").read_bytes() == b"not a png a"  # left in the quarantine folder


@pytest.mark.parametrize("where", ["outside", "dotdot", "symlinked_folder"])
def test_a_quarantined_copy_outside_the_quarantine_folder_is_not_moved(tmp_path: Path, where: str) -> None:
    data, manifest, state = _quarantined(tmp_path)
    secret = tmp_path / "elsewhere" / "a" / "bad.png"  # a file whose digest the manifest knows
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"secret")
    (tmp_path / "q" / "a" / "bad.png").unlink()  # nothing beside the manifest either
    if where == "outside":
        dst = str(secret)
    elif where == "dotdot":
        dst = f"{tmp_path / 'q'}/../elsewhere/a/bad.png"
    else:  # a folder inside the quarantine folder that leads elsewhere
        (tmp_path / "q" / "a").rmdir()
        (tmp_path / "q" / "a").symlink_to(secret.parent, target_is_directory=True)
        dst = str(tmp_path / "q" / "a" / "bad.png")
    _edit(manifest, state, 0, dst=dst, sha256=hashlib.sha256(b"secret").hexdigest())
    res = undo_quarantine(manifest)
    assert secret.read_bytes() == b"secret" and not (data / "a" / "bad.png").exists()
    assert len(res.restored) == 2
    assert [p for p, _ in res.skipped] == [str(data / "a" / "bad.png")]
    reason = res.skipped[0][1]
    assert reason.startswith("manifest entry 1: ")
    assert f"outside the quarantine folder {manifest.parent}" in reason and "undo moves files only from" in reason


def test_a_manifest_whose_data_folder_is_the_filesystem_root_restores_nothing(tmp_path: Path) -> None:
    data, manifest, state = _quarantined(tmp_path)
    state["data_root"] = "/"
    manifest.write_text(json.dumps(state))
    with pytest.raises(ImageRecError, match=r"'data_root' is not the absolute path of a data folder: '/'"):
        undo_quarantine(manifest)
    assert not any((data / c / "bad.png").exists() for c in "abc")


def test_a_moved_quarantine_folder_is_used_not_its_old_copy(tmp_path: Path) -> None:
    # the recorded paths point at the old folder, still there as a copy: undo takes the files beside
    # the manifest it was given (the only folder it may move files from)
    import shutil

    data, manifest, _ = _quarantined(tmp_path)
    shutil.copytree(tmp_path / "q", tmp_path / "review")
    res = undo_quarantine(tmp_path / "review" / manifest.name)
    assert res.ok and len(res.restored) == 3
    assert not any((tmp_path / "review" / c / "bad.png").exists() for c in "abc")
    assert all((tmp_path / "q" / c / "bad.png").is_file() for c in "abc")
    assert (data / "b" / "bad.png").read_bytes() == b"not a png b"
