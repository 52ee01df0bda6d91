"""export_dataset: labels whose folder names would clash, and output paths that cannot be used."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from imagerec.data import read_data
from imagerec.store import export_dataset, export_dataset_command, ingest, open_store
from imagerec.utils import ImageRecError

CLASHING = ["cat", "cat ", "a/b", "a_b", "dog"]


@pytest.fixture
def clashing_store(store_url: str, tmp_path: Path) -> str:
    """A store with dataset 'clash': two images for each label in CLASHING (from a JSONL manifest)."""
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for k in range(2 * len(CLASHING)):
        Image.new("L", (4, 4), 20 * k).save(src / f"{k}.png")
        rows.append(json.dumps({"path": f"{k}.png", "labels": [CLASHING[k % len(CLASHING)]]}))
    (src / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    with open_store(store_url) as store:
        assert ingest(store, str(src / "manifest.jsonl"), "clash", progress=False).added == 10
    return store_url


def test_labels_that_map_to_one_folder_get_distinct_folders(
    clashing_store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folders = []
    for attempt in ("one", "two"):
        out = tmp_path / attempt
        with caplog.at_level(logging.WARNING, logger="imagerec"), open_store(clashing_store) as store:
            assert export_dataset(store, "clash", out) == 10
        per_folder = Counter(p.parent.name for p in out.rglob("*.png"))
        assert len(per_folder) == 5 and set(per_folder.values()) == {2}  # no class merged into another
        assert {"cat", "a_b", "dog"} <= set(per_folder)  # labels that are already safe keep their name
        folders.append(sorted(per_folder))
        spec = read_data(str(out))
        assert len(spec.class_names) == 5
    assert folders[0] == folders[1]  # deterministic
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "'cat'" in warning and "'cat '" in warning and "'a/b'" in warning and "'a_b'" in warning
    assert "'dog'" not in warning


@pytest.fixture
def one_image_store(store_url: str, tmp_path: Path) -> tuple[str, Path]:
    """(url, image): a store with dataset 'one' holding one image, of class 'cls'."""
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    Image.new("L", (4, 4), 7).save(src / "a.png")
    with open_store(store_url) as store:
        ingest(store, str(src.parent), "one", progress=False)
    return store_url, src / "a.png"


def test_an_unknown_dataset_creates_no_output_folder(one_image_store: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = one_image_store
    with open_store(url) as store, pytest.raises(ImageRecError, match="no dataset 'nosuch'"):
        export_dataset(store, "nosuch", tmp_path / "out_x")
    assert not (tmp_path / "out_x").exists()
    with pytest.raises(ImageRecError, match="no dataset 'nosuch'"):
        export_dataset_command("nosuch", str(tmp_path / "out_y"), url)
    assert not (tmp_path / "out_y").exists()


def test_an_output_path_under_a_file_is_a_clear_error(one_image_store: tuple[str, Path], tmp_path: Path) -> None:
    from imagerec.cli import main as cli_main

    url, image = one_image_store
    afile = tmp_path / "afile"
    afile.write_text("x")
    with open_store(url) as store, pytest.raises(ImageRecError, match=f"{afile} is a file, not a folder"):
        export_dataset(store, "one", afile / "sub")
    assert cli_main(["export-dataset", "one", str(afile / "sub"), "--db", url]) == 2
    assert cli_main(["export-dataset", "store:one", str(tmp_path / "ok"), "--db", url]) == 0
    assert (tmp_path / "ok" / "train" / "cls" / "a.png").read_bytes() == image.read_bytes()


@pytest.mark.parametrize("mnist_store", ["sqlite"], indirect=True)
def test_a_killed_export_leaves_no_folder_that_looks_complete_and_a_rerun_finishes(
    mnist_store: tuple[str, object], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import hashlib
    import subprocess
    import sys
    import time

    from imagerec.cli import main as cli_main

    url, _ = mnist_store
    out = tmp_path / "exported"
    proc = subprocess.Popen([sys.executable, "-m", "imagerec.cli", "export-dataset", "mnist", str(out), "--db", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    written, deadline = 0, time.monotonic() + 120
    while proc.poll() is None and written < 200 and time.monotonic() < deadline:
        written = sum(1 for _ in tmp_path.rglob("*.png"))  # wherever the export writes them
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert 200 <= written < 7000, f"the export was not caught midway ({written} files written)"
    assert not out.exists()  # only a hidden .exported.partial-PID folder, which no reader takes for the dataset
    assert [p.name for p in tmp_path.iterdir()] == [f".exported.partial-{proc.pid}"]

    with caplog.at_level(logging.WARNING, logger="imagerec"):
        assert cli_main(["export-dataset", "mnist", str(out), "--db", url]) == 0  # no cleanup by hand
    assert "export-dataset that was interrupted" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]
    files = list(out.rglob("*.png"))
    assert len(files) == 7000
    assert all(hashlib.sha256(f.read_bytes()).hexdigest().startswith(f.stem) for f in files[::97])  # bytes as stored


def test_a_full_disk_exports_nothing_and_names_the_folder(clashing_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import errno

    import imagerec.store.export as export_module

    opened = []

    def open_until_full(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(path)
        if len(opened) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(export_module, "open", open_until_full, raising=False)
    out = tmp_path / "exports" / "out"
    with open_store(clashing_store) as store, pytest.raises(ImageRecError, match=f"cannot export to {out}: No space left on device"):
        export_dataset(store, "clash", out)
    assert list(out.parent.iterdir()) == []  # no half export, no staging folder left behind
    monkeypatch.undo()
    with open_store(clashing_store) as store:
        assert export_dataset(store, "clash", out) == 10
