"""Label conflicts on ingest (the same bytes under other labels/splits, in the source or in the store),
`update=True` / `--update` relabelling, duplicates across batches, and no empty dataset left by an
ingest that stored nothing."""

from __future__ import annotations

import importlib
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from store_helpers import assert_healthy, stored_counts

from imagerec.store import ingest, ingest_command, list_datasets, open_store, read_store

ingest_module = importlib.import_module("imagerec.store.ingest")  # `imagerec.store.ingest` is also the function


def png(path: Path, shade: int) -> Path:
    """A tiny grey PNG whose bytes depend only on `shade`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), shade).save(path)
    return path


def three_by_two(root: Path) -> Path:
    """`<label>/<k>.png`: cat 0-2, dog 3-5, all different bytes."""
    for k in range(6):
        png(root / ("cat" if k < 3 else "dog") / f"{k}.png", 10 * k)
    return root


def dataset_names(url: str) -> list[str]:
    with open_store(url) as store:
        return [d["name"] for d in list_datasets(store)]


def test_relabel_is_reported_and_update_rewrites_it(store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = three_by_two(tmp_path / "pets")
    with open_store(store_url) as store:
        first = ingest(store, str(root), "pets", progress=False)
        assert (first.added, first.stored_conflicts, first.source_conflicts) == (6, [], [])
        shutil.move(root / "cat" / "0.png", root / "dog" / "0.png")

        again = ingest(store, str(root), "pets", progress=False)
        assert (again.added, again.already_present, again.relabelled) == (0, 5, [])
        (c,) = again.stored_conflicts
        assert (c.path, c.labels, c.other_path, c.other_labels) == (
            str(root / "dog" / "0.png"), ("dog",), str(root / "cat" / "0.png"), ("cat",)
        )
        assert "1 stored with other labels/split" in again.summary()
        assert stored_counts(store_url, "pets") == {"train": Counter(cat=3, dog=3)}  # not changed without update

        # a new class too: class_names are extended in the batch that uses it
        (root / "bird").mkdir()
        shutil.move(root / "cat" / "1.png", root / "bird" / "1.png")
        updated = ingest(store, str(root), "pets", update=True, progress=False)
        assert (updated.added, updated.already_present, updated.stored_conflicts) == (0, 4, [])
        assert sorted((r.other_labels, r.labels) for r in updated.relabelled) == [(("cat",), ("bird",)), (("cat",), ("dog",))]
        assert "2 relabelled" in updated.summary()
        assert stored_counts(store_url, "pets") == {"train": Counter(cat=1, dog=4, bird=1)}
        spec = read_store("pets", store=store)
        assert spec.class_names == ["cat", "dog", "bird"]
        assert Counter(spec.class_names[it.target] for it in spec.splits["train"]) == Counter(cat=1, dog=4, bird=1)

        settled = ingest(store, str(root), "pets", progress=False)
        assert (settled.already_present, settled.stored_conflicts, settled.relabelled) == (6, [], [])
    assert assert_healthy(store_url)["images"] == 6

    # the CLI: the summary and the listing say what to do
    shutil.move(root / "dog" / "0.png", root / "cat" / "0.png")
    assert ingest_command(str(root), "pets", None, store_url) == 0
    out = capsys.readouterr().out
    assert "1 stored with other labels/split" in out and "--update" in out
    assert str(root / "cat" / "0.png") in out and str(root / "dog" / "0.png") in out
    from imagerec.cli import main as cli_main

    assert cli_main(["ingest", str(root), "--dataset", "pets", "--db", store_url, "--update"]) == 0
    assert "1 relabelled" in capsys.readouterr().out
    assert stored_counts(store_url, "pets")["train"]["cat"] == 2


def test_duplicates_in_the_source_with_other_labels_or_splits(
    store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "src"
    for k in range(4):
        png(root / "train" / ("cat" if k % 2 else "dog") / f"{k}.png", 40 * k)
    x = png(root / "train" / "cat" / "x.png", 200)
    for copy in (root / "val" / "dog" / "y.png", root / "val" / "cat" / "z.png"):
        copy.parent.mkdir(parents=True)
        shutil.copy(x, copy)
    shutil.copy(root / "train" / "dog" / "0.png", root / "train" / "dog" / "0-copy.png")  # same label, same split
    with open_store(store_url) as store:
        report = ingest(store, str(root), "src", progress=False)
    assert (report.added, report.duplicates, report.already_present) == (5, 3, 0)
    conflicts = sorted((c.path, c.split, c.labels, c.other_path, c.other_split, c.other_labels) for c in report.source_conflicts)
    assert conflicts == [
        (str(root / "val" / "cat" / "z.png"), "val", ("cat",), str(x), "train", ("cat",)),
        (str(root / "val" / "dog" / "y.png"), "val", ("dog",), str(x), "train", ("cat",)),
    ]
    assert "3 duplicate(s) in the source (2 with other labels/split)" in report.summary()
    assert stored_counts(store_url, "src") == {"train": Counter(cat=3, dog=2)}  # the first copy is kept

    assert ingest_command(str(root), "src", None, store_url) == 0
    out = capsys.readouterr().out
    assert "2 with other labels/split" in out
    assert str(root / "val" / "dog" / "y.png") in out and str(x) in out


def test_a_duplicate_batches_after_its_first_copy_is_a_duplicate(store_url: str, tmp_path: Path) -> None:
    root = tmp_path / "src"
    for k in range(7):
        png(root / "digit" / f"{k}.png", 30 * k)
    shutil.copy(root / "digit" / "0.png", root / "digit" / "9.png")  # listed last: 3 batches after 0.png
    with open_store(store_url) as store:
        report = ingest(store, str(root), "d", batch_size=2, progress=False)
    assert (report.seen, report.added, report.already_present, report.duplicates) == (8, 7, 0, 1)
    assert report.source_conflicts == []


def test_an_ingest_that_stores_nothing_leaves_no_dataset(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    junk = tmp_path / "junk" / "cls"
    junk.mkdir(parents=True)
    (junk / "a.png").write_bytes(b"not a png")
    (junk / "b.png").write_bytes(b"")
    with open_store(store_url) as store:
        report = ingest(store, str(junk.parent), "junk", progress=False)
    assert (report.seen, report.added, len(report.skipped)) == (2, 0, 2)
    assert "junk" not in dataset_names(store_url)

    # an error before the first batch commits: nothing stored, no dataset
    root = three_by_two(tmp_path / "pets")
    real_prepare = ingest_module._prepare
    calls = []

    def failing_prepare(*args: object) -> dict:
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("disk gone")
        return real_prepare(*args)

    monkeypatch.setattr(ingest_module, "_prepare", failing_prepare)
    with open_store(store_url) as store, pytest.raises(RuntimeError, match="disk gone"):
        ingest(store, str(root), "pets", batch_size=5, progress=False)
    assert "pets" not in dataset_names(store_url)
    monkeypatch.undo()

    # a dataset that exists is never removed, even when an ingest into it stores nothing
    with open_store(store_url) as store:
        assert ingest(store, str(root), "pets", progress=False).added == 6
        assert ingest(store, str(junk.parent), "pets", progress=False).added == 0
    assert "pets" in dataset_names(store_url)
    assert assert_healthy(store_url)["images"] == 6
