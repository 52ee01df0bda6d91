"""HTML report, quarantine and its undo on the planted folder."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from imagerec.doctor import check_data, quarantine, undo_quarantine, write_html
from imagerec.utils import ImageRecError


def test_html_is_self_contained_with_thumbnails(planted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = planted
    rep = check_data(str(root), workers=2)
    page = write_html(rep, tmp_path / "report.html").read_text(encoding="utf-8")
    thumbs = re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)
    assert len(thumbs) >= 10
    assert not re.search(r"https?://", page)
    assert 'class="ph"' in page  # placeholder boxes for the undecodable files
    for cat in ("truncated", "decompression_bomb", "near_duplicate", "label_typo"):
        assert f'id="{cat}"' in page
    assert "exact copy of train file" in page  # the detail text


def test_html_escapes_hostile_names(tmp_path: Path, planted) -> None:  # type: ignore[no-untyped-def]
    root, _ = planted
    d = tmp_path / "x" / "a"
    d.mkdir(parents=True)
    (d / "<script>alert(1)<").mkdir()
    (d / "<script>alert(1)<" / "x.txt").write_text("hi")
    (d / "ok.jpg").write_bytes((root / "train/cat/clean_00.jpg").read_bytes())
    page = write_html(check_data(str(tmp_path / "x")), tmp_path / "r.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_quarantine_moves_error_files_and_undo_restores(fresh_dataset: Path, tmp_path: Path) -> None:
    root = fresh_dataset
    before = {p: _sha(p) for p in root.rglob("*") if p.is_file()}
    rep = check_data(str(root), workers=2)
    errors = {Path(p.path) for p in rep.problems if p.severity == "error"}
    dest = tmp_path / "quarantined"
    manifest = quarantine(rep, dest)

    moved = {p for p in before if not p.exists()}
    assert moved == errors
    assert {p.relative_to(root).as_posix() for p in moved} == {
        "train/cat/truncated.jpg", "train/cat/truncated.png", "train/cat/bad_crc.png", "train/cat/zero.jpg",
        "train/cat/text.jpg", "train/cat/document.png", "train/cat/garbage.png", "train/cat/bomb.png",
        "test/bird/leak_copy.jpg",
    }  # fmt: skip
    import json

    state = json.loads(manifest.read_text())
    assert state["complete"] is True
    assert {Path(m["src"]) for m in state["moves"]} == moved
    for m in state["moves"]:
        assert m["state"] == "moved" and Path(m["dst"]).is_file() and m["sha256"] == before[Path(m["src"])]
        assert Path(m["dst"]) == dest / Path(m["src"]).relative_to(root)

    again = check_data(str(root), workers=2)
    assert not {Path(p.path) for p in again.problems} & moved
    assert again.n_errors == 0

    with pytest.raises(ImageRecError, match="already exists"):
        quarantine(again, dest)

    # a file re-created at an original path is not overwritten by undo
    blocker = root / "train/cat/zero.jpg"
    blocker.write_bytes(b"new")
    res = undo_quarantine(manifest)
    assert [p for p, _ in res.skipped] == [str(blocker)]
    assert blocker.read_bytes() == b"new"
    blocker.unlink()
    res2 = undo_quarantine(manifest)
    assert res2.restored == [str(blocker)] and res2.ok
    after = {p: _sha(p) for p in root.rglob("*") if p.is_file()}
    assert after == before  # byte-identical, nothing lost or added


def test_quarantine_refuses_non_folder_sources(planted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import tarfile

    root, _ = planted
    archive = tmp_path / "pets.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(root / "train", arcname="train")
    with pytest.raises(ImageRecError, match="only image folders"):
        quarantine(check_data(str(archive)), tmp_path / "q")
    with pytest.raises(ImageRecError, match="outside the data folder"):
        quarantine(check_data(str(root)), root / "q")
