"""Ingest of real data (mnist-mini IDX arrays, CIFAR-10 JPEGs), idempotency, `store:NAME` read-back,
byte-identical export, and listing."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from store_helpers import CORRUPT_FILES, SourceFacts, assert_healthy, stored_counts

from imagerec.data import read_data
from imagerec.data.decode import decode_bytes
from imagerec.store import export_dataset, ingest, list_datasets, open_store, read_blob, read_store
from imagerec.utils import ImageRecError


def test_ingest_mnist_counts_match_source(mnist_store: tuple, mnist_source: SourceFacts) -> None:
    url, report = mnist_store
    assert report.seen == report.added == 7000
    assert report.added_per_split == {"train": 6000, "test": 1000}
    assert (report.already_present, report.duplicates, report.skipped) == (0, 0, [])
    assert stored_counts(url, "mnist") == mnist_source.counts()
    facts = assert_healthy(url)
    assert facts["images"] == facts["blobs"] == 7000


def test_second_ingest_adds_nothing(mnist_store: tuple, mnist_source: SourceFacts) -> None:
    url, _ = mnist_store
    with open_store(url) as store:
        again = ingest(store, "mnist-mini", "mnist", batch_size=1000, progress=False)
    assert (again.added, again.already_present, again.skipped) == (0, 7000, [])
    assert stored_counts(url, "mnist") == mnist_source.counts()
    assert assert_healthy(url)["images"] == 7000


def test_store_name_reads_back_the_same_items(mnist_store: tuple, mnist_source: SourceFacts) -> None:
    url, _ = mnist_store
    spec = read_store("mnist", url=url)
    assert spec.origin == "store:mnist"
    assert spec.class_names == mnist_source.spec.class_names
    assert spec.counts() == {"train": 6000, "test": 1000}
    assert not spec.multi_label
    for split, expected in mnist_source.items.items():
        got = [(it.source.sha256, spec.class_names[it.target]) for it in spec.splits[split]]
        assert got == expected  # same images, same labels, same order
    # the bytes behind a StoreBlob decode to the original pixels
    src = mnist_source.spec
    for split, index in (("train", 0), ("train", 5999), ("test", 123)):
        img = decode_bytes(read_blob(spec.splits[split][index].source), "blob", channels=1)
        assert np.array_equal(np.asarray(img), src.arrays[split][index])
    with pytest.raises(ImageRecError, match="no dataset 'mnsit'.*Did you mean 'mnist'"):
        read_store("mnsit", url=url)


def test_export_is_byte_identical_and_refuses_to_overwrite(
    mnist_store: tuple, mnist_source: SourceFacts, tmp_path: Path
) -> None:
    url, _ = mnist_store
    out = tmp_path / "export"
    with open_store(url) as store:
        assert export_dataset(store, "mnist", out) == 7000
        files = sorted(out.rglob("*.png"))
        assert len(files) == 7000
        exported = Counter()
        for f in files:
            split, label = f.relative_to(out).parts[:2]
            assert f.stem == hashlib.sha256(f.read_bytes()).hexdigest()[:16]  # named by content, bytes intact
            exported[(split, label, hashlib.sha256(f.read_bytes()).hexdigest())] += 1
        expected = Counter((split, label, sha) for split, rows in mnist_source.items.items() for sha, label in rows)
        assert exported == expected
        # the exported folder is itself a dataset with the same counts
        assert {s: len(v) for s, v in read_data(str(out)).splits.items()} == {"train": 6000, "test": 1000}
        before = {f: f.stat().st_mtime_ns for f in files[:50]}
        with pytest.raises(ImageRecError, match="not an empty folder"):
            export_dataset(store, "mnist", out)
        assert {f: f.stat().st_mtime_ns for f in files[:50]} == before


def test_list_datasets_counts(mnist_store: tuple, mnist_source: SourceFacts) -> None:
    url, _ = mnist_store
    with open_store(url) as store:
        (ds,) = [d for d in list_datasets(store) if d["name"] == "mnist"]
    assert ds["images"] == 7000
    assert ds["splits"] == {"train": 6000, "test": 1000}
    assert ds["class_names"] == [str(d) for d in range(10)]
    counts = mnist_source.counts()
    assert ds["split_labels"] == {s: dict(sorted(c.items(), key=lambda kv: int(kv[0]))) for s, c in counts.items()}
    assert ds["labels"] == {k: counts["train"][k] + counts["test"][k] for k in ds["class_names"]}
    assert ds["bytes"] > 7000 * 100


def test_ingest_cifar_jpeg_folder(store_url: str, cifar_folder: Path, cifar_source: SourceFacts, tmp_path: Path) -> None:
    with open_store(store_url) as store:
        report = ingest(store, str(cifar_folder), "cifar", batch_size=64, progress=False)
        expected_n = sum(len(v) for v in cifar_source.items.values())
        assert report.added == expected_n == 300
        assert sorted(Path(name).relative_to(cifar_folder).as_posix() for name, _ in report.skipped) == sorted(CORRUPT_FILES)
        assert any("not an image" in reason for _, reason in report.skipped)
        assert stored_counts(store_url, "cifar") == cifar_source.counts()

        again = ingest(store, str(cifar_folder), "cifar", progress=False)
        assert (again.added, again.already_present, len(again.skipped)) == (0, 300, 2)
        assert assert_healthy(store_url)["images"] == 300

        # export: original file names, original bytes, original folders
        out = tmp_path / "out"
        assert export_dataset(store, "cifar", out) == 300
        for its in cifar_source.spec.splits.values():
            for it in its:
                rel = Path(it.source).relative_to(cifar_folder)
                if rel.as_posix() in CORRUPT_FILES:
                    assert not (out / rel).exists()
                else:
                    assert (out / rel).read_bytes() == Path(it.source).read_bytes()

        spec = read_store("cifar", store=store)
        assert spec.class_names == cifar_source.spec.class_names
        got = {s: Counter(spec.class_names[it.target] for it in v) for s, v in spec.splits.items()}
        assert got == cifar_source.counts()


def test_ingest_one_split_and_a_flat_folder_under_a_split(store_url: str, cifar_folder: Path) -> None:
    with open_store(store_url) as store:
        report = ingest(store, str(cifar_folder), "only-test", split="test", progress=False)
        assert report.added_per_split == {"test": 150}  # 151 listed, one is not an image
        flat = cifar_folder / "test"  # <class>/<image>: no split layout, stored as 'val'
        report = ingest(store, str(flat), "as-val", split="val", progress=False)
        assert report.added_per_split == {"val": 150}
        with pytest.raises(ImageRecError, match="has no 'val' split"):
            ingest(store, str(cifar_folder), "x", split="val", progress=False)
        with pytest.raises(ImageRecError, match="invalid dataset name"):
            ingest(store, str(flat), "bad name!", progress=False)


def test_reports_name_stored_images_by_the_path_they_came_from(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`check store:NAME` and decode errors show where an image was ingested from; the data
    fingerprint still hashes the content address only, so recorded runs keep their data hash."""
    from PIL import Image

    from imagerec.data.decode import display_name, source_name
    from imagerec.doctor.check import check_data

    spec = read_data("mnist-mini")
    for k, it in enumerate(spec.splits["train"][:12]):
        d = tmp_path / "digits" / spec.class_names[it.target % 2]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(spec.arrays["train"][it.source.index]).save(d / f"{k}.png")
    tiny = tmp_path / "digits" / "0" / "tiny.png"
    Image.new("L", (4, 4), 255).save(tiny)
    with open_store(store_url) as store:
        ingest(store, str(tmp_path / "digits"), "digits", progress=False)
    stored = read_store("digits", url=store_url)
    src = next(it.source for it in stored.splits["train"] if it.source.original_path.endswith("tiny.png"))
    assert source_name(src) == f"store:{src.sha256}"  # what fingerprints hash: unchanged
    assert display_name(src) == f"{src.original_path} (store:{src.sha256})"
    monkeypatch.setenv("IMAGEREC_DB", store_url)
    report = check_data("store:digits", min_side=8)
    small = [p for p in report.problems if "tiny.png" in p.path]
    assert small and small[0].path == display_name(src), [p.path for p in report.problems]


def test_ingest_reports_what_the_reader_left_out(store_url: str, cifar_folder: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A test-only class is dropped by the reader: ingest says so, so the counts add up."""
    from imagerec.store import ingest_command

    jpgs = sorted(cifar_folder.rglob("*.jpg"))[:9]
    root = tmp_path / "te"
    for k, src in enumerate(jpgs):
        where = ("train/cat", "train/dog", "test/bird")[k % 3]
        (root / where).mkdir(parents=True, exist_ok=True)
        (root / where / f"{k}.jpg").write_bytes(src.read_bytes())
    with open_store(store_url) as store:
        report = ingest(store, str(root), "te", progress=False)
    assert report.seen == 6 and report.notes == [f"{root}: test has classes missing from train (dropped): bird"]
    assert "1 note(s) below" in report.summary()
    assert ingest_command(str(root), "te2", db=store_url) == 0
    out = capsys.readouterr().out
    assert "left out:" in out and "missing from train (dropped): bird" in out
