"""Session 21: `check --undo` when an original path is blocked (a folder there now, or a file where
its folder was) leaves that entry with one clear reason and still restores the others."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from imagerec.doctor import check_data, quarantine, undo_quarantine
from imagerec.doctor.command import check_command


def _quarantined(tmp_path: Path) -> tuple[Path, Path]:
    """data/{a,b,c}/ with two good PNGs and one broken 'bad.png' each, the broken ones quarantined."""
    data = tmp_path / "data"
    for c in ("a", "b", "c"):
        (data / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(data / c / f"{i}.png")
        (data / c / "bad.png").write_bytes(b"not a png")
    manifest = quarantine(check_data(str(data)), tmp_path / "q")
    assert not any((data / c / "bad.png").exists() for c in "abc")
    return data, manifest


def test_undo_with_blocked_original_paths_skips_them_and_restores_the_rest(tmp_path: Path) -> None:
    data, manifest = _quarantined(tmp_path)
    (data / "a" / "bad.png").mkdir()  # a folder where the file was
    shutil.rmtree(data / "b")
    (data / "b").write_text("x")  # a file where its class folder was
    res = undo_quarantine(manifest)
    assert res.restored == [str(data / "c" / "bad.png")]
    assert (data / "c" / "bad.png").read_bytes() == b"not a png"
    reasons = dict(res.skipped)
    assert reasons[str(data / "a" / "bad.png")].startswith("a folder is at the original path now; not overwritten")
    assert reasons[str(data / "b" / "bad.png")].startswith(f"{data / 'b'} is a file now, where the folder of the "
                                                           "original path was: move that file away and undo again")
    assert (tmp_path / "q" / "a" / "bad.png").is_file() and (tmp_path / "q" / "b" / "bad.png").is_file()
    # once the paths are cleared, a second undo restores the two left
    (data / "a" / "bad.png").rmdir()
    (data / "b").unlink()
    assert sorted(undo_quarantine(manifest).restored) == [str(data / "a" / "bad.png"), str(data / "b" / "bad.png")]


def test_check_undo_prints_one_line_per_blocked_entry(tmp_path: Path, capsys) -> None:
    data, manifest = _quarantined(tmp_path)
    shutil.rmtree(data / "b")
    (data / "b").write_text("x")
    assert check_command(None, undo=str(manifest)) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"restored 2 file(s) from {manifest}")
    assert "not restored" in out and "Errno" not in out and "is a file now" in out
