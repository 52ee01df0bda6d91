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


def _small_folder(root: Path, classes: tuple[str, ...] = ("cat", "bird")) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for k in range(5):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / cls / f"{k}.png")


def test_quarantine_lists_the_files_it_leaves_behind_a_symlink_out_of_data(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from imagerec.doctor.command import check_command

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    _small_folder(data, ("cat",))
    _small_folder(elsewhere, ("bird",))
    (data / "cat" / "bad.png").write_text("junk")
    (elsewhere / "bird" / "broken.png").write_text("junk")
    (data / "bird").symlink_to(elsewhere / "bird", target_is_directory=True)  # read as class 'bird'
    assert check_command(str(data), fmt="json", fix="quarantine", fix_dest=str(tmp_path / "q")) == 1
    out = json.loads(capsys.readouterr().out)
    left = str(data / "bird" / "broken.png")
    assert [s["path"] for s in out["quarantine_skipped"]] == [left]
    assert "outside the data folder" in out["quarantine_skipped"][0]["reason"]
    state = json.loads(Path(out["quarantine_manifest"]).read_text())
    assert state["skipped"] == out["quarantine_skipped"]
    assert [m["src"] for m in state["moves"]] == [str(data / "cat" / "bad.png")]
    assert (elsewhere / "bird" / "broken.png").read_text() == "junk"  # nothing outside DATA is touched

    assert check_command(str(data), fix="quarantine", fix_dest=str(tmp_path / "q2")) == 1
    table = capsys.readouterr().out
    assert f"not quarantined {left}: its real file {elsewhere / 'bird' / 'broken.png'} is outside" in table


@pytest.mark.parametrize("how", ["full disk", "killed"])
def test_a_move_stopped_midway_leaves_the_original_and_undo_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     how: str) -> None:
    """Across filesystems a move is copy + delete: a full disk (or a kill) stops it with a partial copy."""
    import errno
    import json
    import shutil

    data = tmp_path / "data"
    _small_folder(data)
    big = data / "cat" / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 400)
    before = _sha(big)

    def partial_copy(src: str, dst: str) -> None:
        Path(dst).write_bytes(Path(src).read_bytes()[:4096])
        if how == "killed":
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "move", partial_copy)
    dest = tmp_path / "q"
    if how == "killed":
        with pytest.raises(KeyboardInterrupt):
            quarantine(check_data(str(data)), dest)
        assert (dest / "cat" / "big.png").stat().st_size == 4096  # the kill left the partial copy
    else:
        manifest = quarantine(check_data(str(data)), dest)
        state = json.loads(manifest.read_text())
        assert state["skipped"] == [{"path": str(big), "reason": f"could not be moved to {dest / 'cat' / 'big.png'}: "
                                                                 "No space left on device"}]
        assert not (dest / "cat" / "big.png").exists()  # the partial copy is removed
    monkeypatch.undo()
    assert _sha(big) == before
    res = undo_quarantine(dest / "quarantine-manifest.json")
    assert res.restored == [] and [p for p, _ in res.skipped] == [str(big)]
    reason = res.skipped[0][1]
    assert reason.startswith("never moved"), reason  # not "a file exists at the original path now"
    assert _sha(big) == before


def test_html_with_quarantine_keeps_the_thumbnails_of_the_moved_files(tmp_path: Path) -> None:
    # the page is written before the quarantine moves the files its thumbnails are read from
    import shutil

    from imagerec.doctor.command import check_command

    data = tmp_path / "data"
    _small_folder(data / "train")
    _small_folder(data / "test")
    shutil.copy(data / "train" / "cat" / "1.png", data / "test" / "cat" / "leak.png")  # split_leakage: an error
    html = tmp_path / "report.html"
    assert check_command(str(data), html=str(html), fix="quarantine", fix_dest=str(tmp_path / "q")) == 1
    assert (tmp_path / "q" / "test" / "cat" / "leak.png").is_file()  # it was moved
    page = html.read_text(encoding="utf-8")
    i = page.find("leak.png")
    card = page[page.rfind('class="card"', 0, i) : i]
    assert '<img src="data:image/png;base64,' in card and 'class="ph"' not in card


def test_a_store_source_is_called_a_store_and_gets_store_advice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imagerec.doctor.output import report_to_json
    from imagerec.store import ingest, open_store

    _small_folder(tmp_path / "data")
    db = tmp_path / "store.db"
    monkeypatch.setenv("IMAGEREC_DB", str(db))
    with open_store(str(db)) as store:
        ingest(store, str(tmp_path / "data"), "pets", progress=False)
    rep = check_data("store:pets", workers=1)
    assert rep.source == "store" and report_to_json(rep)["source"] == "store"
    with pytest.raises(ImageRecError, match=r"store:pets: only image folders can be quarantined, this is a dataset "
                                            r"of the image store: export it with `imagerec export-dataset`"):
        quarantine(rep, tmp_path / "q")


def test_undo_after_the_quarantine_folder_was_moved(tmp_path: Path) -> None:
    # the files are looked for beside the manifest when they are not at their recorded paths
    data = tmp_path / "data"
    _small_folder(data)
    zero = data / "cat" / "zero.png"
    zero.write_bytes(b"")
    manifest = quarantine(check_data(str(data), workers=1), tmp_path / "quarantined")
    assert not zero.exists()
    moved = tmp_path / "review"
    manifest.parent.rename(moved)
    res = undo_quarantine(moved / manifest.name)
    assert res.ok and res.restored == [str(zero.resolve())]
    assert zero.is_file() and not (moved / "cat" / "zero.png").exists()
    # gone from both places: the message names the recorded path it looked at
    manifest2 = quarantine(check_data(str(data), workers=1), tmp_path / "q2")
    (tmp_path / "q2" / "cat" / "zero.png").unlink()
    res2 = undo_quarantine(manifest2)
    assert res2.skipped == [(str(zero.resolve()), f"missing from the quarantine folder (not at {tmp_path.resolve() / 'q2' / 'cat' / 'zero.png'})")]


def test_quarantine_gives_the_true_reason_for_a_broken_symlink(tmp_path: Path) -> None:
    # a problem file replaced by a link to nothing after the check is not "moved or deleted"
    data = tmp_path / "data"
    _small_folder(data)
    bad = data / "cat" / "bad.png"
    bad.write_text("junk")
    report = check_data(str(data), workers=1)
    bad.unlink()
    bad.symlink_to("/nonexistent/photo.png")
    import json

    state = json.loads(quarantine(report, tmp_path / "q").read_text())
    assert state["skipped"] == [{"path": str(bad), "reason": "a broken symbolic link (its target /nonexistent/photo.png "
                                                             "does not exist): fix or remove the link"}]
