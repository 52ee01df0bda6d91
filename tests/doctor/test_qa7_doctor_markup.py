"""QA pass 7: `imagerec check` prints paths, class names and file names as written. `[...]` in them
is never read as Rich markup: `[bold]` is not eaten and `[/x]` is not a MarkupError after the work.

Images are real mnist-mini digits written as PNGs; one file of each class folder is broken. A name
cannot hold '/', so `[/x]` is in a path: DATA `data[/x]` is the folder `x]` in the folder `data[`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from imagerec.cli import main
from imagerec.data import read_data

CLASSES = ("[bold]cat", "dog[x]", "c[lr=0.1]")
BAD = "bad[bold].png"


def digit_folder(root: Path, per_class: int = 6) -> Path:
    """`root/<class>/<k>[x].png` real digits for each class of CLASSES, and a broken BAD in each."""
    spec = read_data("mnist-mini")
    items = iter(spec.splits["test"])
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(spec.arrays["test"][next(items).source.index]).save(root / c / f"{k}[x].png")
        (root / c / BAD).write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    return root


def test_check_quarantine_and_undo_print_paths_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per path: the table folds nothing
    monkeypatch.chdir(tmp_path)
    data = digit_folder(tmp_path / "data[" / "x]")
    code = main(["check", "data[/x]", "--html", "page[/x]/r.html", "--fix", "quarantine", "q[bold]"])
    out = capsys.readouterr().out
    assert code == 1, out  # the broken files are errors
    assert "imagerec check: data[/x] (folder;" in out  # the table title: DATA as written
    for c in CLASSES:  # the examples column: each broken file's path, brackets and all
        assert f"{c}/{BAD}" in out, out
    assert "HTML report: page[/x]/r.html" in out and Path("page[/x]/r.html").is_file()
    manifest = next((tmp_path / "q[bold]").glob("*.json"))
    assert f"quarantined files listed in {manifest} (undo with --undo {manifest})" in out

    moved = json.loads(manifest.read_text())
    assert len(moved["moves"]) == len(CLASSES), moved
    blocker = data / CLASSES[1] / BAD  # a new file where one was: the undo leaves it, and says so
    blocker.write_bytes(b"new")
    code = main(["check", "--undo", str(manifest)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"restored {len(CLASSES) - 1} file(s) from {manifest}" in out
    assert f"not restored {blocker}: a file exists at the original path now; not overwritten" in out, out
