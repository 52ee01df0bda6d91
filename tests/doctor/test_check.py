"""check_data on a folder seeded with every kind of bad file, on an archive, and on IDX arrays."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from imagerec.doctor import (
    CATEGORIES,
    check_command,
    check_data,
    render_table,
    report_to_json,
)
from imagerec.doctor import check as check_module
from imagerec.doctor.problems import SEVERITY

if TYPE_CHECKING:
    import PIL.Image


@pytest.fixture(scope="module")
def report(planted):  # type: ignore[no-untyped-def]
    root, _ = planted
    return check_data(str(root), workers=2)


def _by_path(report, root: Path) -> dict[str, set[str]]:  # type: ignore[no-untyped-def]
    out: dict[str, set[str]] = {}
    for p in report.problems:
        rel = Path(p.path).relative_to(root).as_posix() if Path(p.path) != root else "."
        out.setdefault(rel, set()).add(p.category)
    return out


def test_every_planted_file_is_reported_in_its_category(planted, report) -> None:  # type: ignore[no-untyped-def]
    root, info = planted
    found = _by_path(report, root)
    for rel, cats in info["expect"].items():
        assert found.get(rel, set()) == cats, f"{rel}: expected {sorted(cats)}, got {sorted(found.get(rel, set()))}"
    for rel, cat in info["folders"].items():
        assert cat in found.get(rel, set()), f"{rel}: expected {cat}, got {found.get(rel)}"
    assert "class_imbalance" in found["."]


def test_no_false_positives_on_clean_images(planted, report) -> None:  # type: ignore[no-untyped-def]
    root, info = planted
    found = _by_path(report, root)
    flagged = [rel for rel in info["clean"] if rel in found]
    assert flagged == [], {rel: found[rel] for rel in flagged}
    allowed = set(info["expect"]) | set(info["folders"]) | {"."}
    assert set(found) <= allowed, set(found) - allowed


def test_problem_details(planted, report) -> None:  # type: ignore[no-untyped-def]
    root, _ = planted
    probs = {(Path(p.path).relative_to(root).as_posix() if Path(p.path) != root else ".", p.category): p for p in report.problems}
    leak = probs[("test/bird/leak_copy.jpg", "split_leakage")]
    assert leak.severity == "error" and leak.extra["match"] == "exact"
    assert leak.extra["duplicate_of"] == str(root / "train/bird/leak.jpg")
    near_leak = probs[("val/cat/near_copy.jpg", "split_leakage")]
    assert near_leak.severity == "warning" and near_leak.extra["match"] == "near"
    assert near_leak.extra["duplicate_of"] == str(root / "train/cat/near_src.jpg")
    assert probs[("train/dog/near_b.jpg", "near_duplicate")].extra["distance"] <= 4
    assert probs[("train/cat/dup_b.jpg", "exact_duplicate")].extra["duplicate_of"] == str(root / "train/cat/dup_a.jpg")
    assert probs[("train/cat/png_named.jpg", "wrong_extension")].extra["actual_format"] == "PNG"
    assert "20000x20000" in probs[("train/cat/bomb.png", "decompression_bomb")].detail
    assert probs[("vaidation", "odd_split_name")].extra["suggestion"] == "val"
    assert probs[("val/Dog", "label_typo")].extra["similar_to"] == "dog"
    assert probs[("train/golden_retreiver", "label_typo")].extra["similar_to"] == "golden_retriever"
    assert probs[("train/cat/notes.txt", "non_image")].label == "cat"
    assert probs[("train/cat/rotated.jpg", "exif_rotation")].extra["orientation"] == 6
    imb = probs[(".", "class_imbalance")]
    assert imb.extra["ratio"] > 3 and imb.path == str(root)
    for p in report.problems:
        assert p.severity in ("error", "warning", "info") and p.detail


def test_summary_and_json_shape(report) -> None:  # type: ignore[no-untyped-def]
    out = report_to_json(report)
    json.dumps(out)  # serialisable
    assert set(out) >= {"problems", "summary"}
    for p in out["problems"]:
        assert {"path", "category", "severity", "detail", "split", "label"} <= set(p)
        assert p["category"] in CATEGORIES
    s = out["summary"]
    assert s["source"] == "folder"
    assert s["classes"]["train"]["cat"] > 3 * s["classes"]["train"]["bird"]
    assert s["images"]["train"] == sum(s["classes"]["train"].values())
    assert s["imbalance_ratio"] > 3
    assert s["problems"]["truncated"] == 2 and s["problems"]["split_leakage"] == 2
    assert s["unlisted_images"] == 2  # vaidation/cat/odd.jpg and val/Dog/capital.jpg


def test_categories_are_documented() -> None:
    for cat in SEVERITY:
        assert f"{cat} [" in check_module.__doc__, cat


def test_table_and_command_exit_codes(planted, capsys) -> None:  # type: ignore[no-untyped-def]
    root, _ = planted
    assert check_command(str(root), fmt="json") == 1
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["severity"]["error"] >= 9
    clean = root.parent / "clean"
    (clean / "a").mkdir(parents=True)
    (clean / "b").mkdir()
    for i, src in enumerate(sorted((root / "train/cat").glob("clean_0*.jpg"))[:4]):
        (clean / "ab"[i % 2] / src.name).write_bytes(src.read_bytes())
    assert check_command(str(clean), fmt="table") == 0
    assert "no problems found" in capsys.readouterr().out


def test_render_table_lists_categories(report) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_table(report))
    text = console.export_text()
    for cat in ("truncated", "decompression_bomb", "split_leakage", "label_typo"):
        assert cat in text


def test_archive_source(planted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = planted
    archive = tmp_path / "pets.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(root, arcname="pets")
    rep = check_data(str(archive), workers=2)
    cats = {(p.path.split("::")[-1], p.category) for p in rep.problems}
    assert rep.source == "archive"
    assert ("pets/train/cat/truncated.jpg", "truncated") in cats
    assert ("pets/train/cat/bomb.png", "decompression_bomb") in cats
    assert ("pets/test/bird/leak_copy.jpg", "split_leakage") in cats
    assert any(p.category == "label_typo" for p in rep.problems)


def test_mnist_arrays_summary() -> None:
    rep = check_data("mnist-mini")
    assert rep.source == "arrays"
    assert rep.summary["num_classes"] == 10
    assert rep.summary["images"] == {"train": 6000, "test": 1000}
    assert rep.summary["imbalance_ratio"] == 1.0
    # only hash/duplicate/imbalance checks apply to arrays
    assert {p.category for p in rep.problems} <= {"exact_duplicate", "near_duplicate", "split_leakage", "class_imbalance"}


def test_planted_set_covers_at_least_twenty_kinds(planted, report) -> None:  # type: ignore[no-untyped-def]
    root, info = planted
    kinds = {c for cats in info["expect"].values() for c in cats} | set(info["folders"].values())
    assert len(kinds | {"class_imbalance"}) >= 20, sorted(kinds)
    assert len({p.category for p in report.problems}) >= 20


def test_training_on_the_planted_folder_completes_and_lists_skipped_files(planted, report, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import imagerec
    from imagerec.data import DecodeError, open_image, read_data

    root, _ = planted
    result = imagerec.train(data=str(root), out=str(tmp_path / "run"), epochs=1, batch_size=8, image_size=32)
    skipped = "\n".join(result.metrics["skipped_files"])
    listed = [str(it.source) for items in read_data(str(root)).splits.values() for it in items]
    undecodable = []
    for path in listed:
        try:
            open_image(path)
        except DecodeError:
            undecodable.append(path)
    assert len(undecodable) >= 4, undecodable  # zero-byte, truncated, bomb, text-as-jpg, ...
    errors = {p.path for p in report.problems if p.severity == "error"}
    for path in undecodable:
        assert path in skipped, f"{path} not listed as skipped"
        assert path in errors, f"{path} not reported as an error by the doctor"
    assert result.metrics["test"]["num_samples"] > 0 and (tmp_path / "run" / "metrics.json").is_file()


# --- what the reader leaves out; zips with duplicate names; near copies on real images ---------


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_images_the_reader_drops_are_reported_in_every_format(tmp_path: Path, capsys, cifar_jpegs) -> None:  # type: ignore[no-untyped-def]
    from imagerec.doctor import write_html

    imgs = cifar_jpegs[:13]
    root = tmp_path / "te"
    for k in range(5):
        _write(root / "train/cat" / f"{k}.jpg", imgs[k])
        _write(root / "train/dog" / f"{k}.jpg", imgs[5 + k])
    for k in range(3):  # a class that train lacks: dropped by the reader
        _write(root / "test/bird" / f"{k}.jpg", imgs[10 + k])
    report = check_data(str(root), workers=1)
    dropped = [p for p in report.problems if p.category == "skipped_by_reader"]
    assert [(p.severity, p.detail) for p in dropped] == [
        ("warning", f"{root}: test has classes missing from train (dropped): bird")]
    assert report.summary["problems"]["skipped_by_reader"] == 1
    assert report.summary["severity"]["warning"] >= 1
    assert any(p["category"] == "skipped_by_reader" for p in report_to_json(report)["problems"])
    assert "skipped_by_reader" in write_html(report, tmp_path / "r.html").read_text()
    assert check_command(str(root)) == 0
    table = capsys.readouterr().out
    assert "skipped_by_reader" in table and "missing from train" in table

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{root}/train/cat/0.jpg,cat\n{root}/train/dog/0.jpg,dog\n{root}/gone.jpg,dog\n")
    notes = [p.detail for p in check_data(str(manifest), workers=1).problems if p.category == "skipped_by_reader"]
    assert len(notes) == 1 and "row 3: file not found" in notes[0]


def test_a_broken_symlink_is_named_as_one_like_the_reader_does(tmp_path: Path, cifar_jpegs: list[bytes]) -> None:
    # not a "corrupt" error with a raw FileNotFoundError: the reader's note (ingest and train print it too)
    root = tmp_path / "data"
    for k in range(3):
        _write(root / "cat" / f"{k}.jpg", cifar_jpegs[k])
        _write(root / "dog" / f"{k}.jpg", cifar_jpegs[3 + k])
    (root / "cat" / "broken.jpg").symlink_to("/nonexistent/photo.jpg")
    report = check_data(str(root), workers=1)
    assert [(p.category, p.path) for p in report.problems] == [("skipped_by_reader", str(root))]
    assert "cat/broken.jpg -> /nonexistent/photo.jpg" in report.problems[0].detail
    assert report.n_errors == 0 and report.summary["files_checked"] == 6


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_an_archive_reports_the_stray_files_its_folder_does(tmp_path: Path, cifar_jpegs: list[bytes], kind: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    root = tmp_path / "data"
    for k in range(3):
        _write(root / "cat" / f"{k}.jpg", cifar_jpegs[k])
        _write(root / "dog" / f"{k}.jpg", cifar_jpegs[3 + k])
    (root / "cat" / "notes.txt").write_text("some notes")
    (root / "README").write_text("top level")
    (root / "cat" / "link0.jpg").symlink_to("0.jpg")
    folder = check_data(str(root), workers=1)
    archive = tmp_path / f"data.{kind}"
    monkeypatch.chdir(tmp_path)  # members named data/...
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for f in sorted(root.rglob("*")):
                zf.write(f.relative_to(tmp_path))
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add("data")
    packed = check_data(str(archive), workers=1)
    assert packed.summary["images"] == folder.summary["images"] == {"train": 7}
    assert packed.summary["problems"] == folder.summary["problems"]
    strays = sorted((p.path.split("::")[-1], p.severity, p.label) for p in packed.problems if p.category == "non_image")
    assert strays == [("data/README", "info", None), ("data/cat/notes.txt", "warning", "cat")]


def test_zip_members_of_one_name_are_not_called_byte_duplicates(tmp_path: Path, cifar_jpegs: list[bytes]) -> None:
    import warnings
    import zipfile

    imgs = cifar_jpegs[:8]
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        for k in range(3):
            zf.writestr(f"cat/{k}.jpg", imgs[k])
            zf.writestr(f"dog/{k}.jpg", imgs[4 + k])
        zf.writestr("cat/0.jpg", imgs[3])  # another image under an existing name
    report = check_data(str(archive), workers=1)
    assert report.summary["images"] == {"train": 7}
    assert [p.category for p in report.problems if "duplicate" in p.category or p.category == "split_leakage"] == []


def test_distinct_mnist_digits_are_not_near_duplicates() -> None:
    """mnist-mini: 7,000 different handwritten digits. pHash + thumb correlation alone flagged 217 of
    them; the changed-pixel bound leaves only a few plain '1's that differ in a handful of pixels."""
    report = check_data("mnist-mini", workers=1)
    near = [p for p in report.problems if p.category in ("near_duplicate", "split_leakage")]
    assert len(near) <= 10, len(near)
    assert {p.label for p in near} <= {"1"}


def _variants(img: PIL.Image.Image) -> dict[str, bytes]:
    import io

    import numpy as np
    from PIL import Image

    def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    w, h = img.size
    brighter = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + 20, 0, 255).astype(np.uint8))
    return {
        "jpeg.jpg": encode(img.convert("RGB"), "JPEG", quality=75),
        "x2.jpg": encode(img.convert("RGB").resize((2 * w, 2 * h), Image.Resampling.BICUBIC), "JPEG", quality=85),
        "x1.1.png": encode(img.resize((w * 11 // 10, h * 11 // 10), Image.Resampling.BICUBIC), "PNG"),
        "bright.png": encode(brighter, "PNG"),
    }


def test_near_copies_of_real_digits_and_photos_are_found(tmp_path: Path, cifar_jpegs: list[bytes]) -> None:
    import io

    from PIL import Image

    from imagerec.data import read_data

    digits = read_data("mnist-mini").arrays["test"][:30]
    originals = {"digit": [Image.fromarray(d) for d in digits],
                 "photo": [Image.open(io.BytesIO(b)).convert("RGB") for b in cifar_jpegs[:30]]}
    root = tmp_path / "copies"
    expected: dict[str, str] = {}  # copy -> its original
    for kind, imgs in originals.items():
        for k, img in enumerate(imgs):
            orig = root / kind / f"{k:02d}.png"
            orig.parent.mkdir(parents=True, exist_ok=True)
            img.save(orig)
            for name, data in _variants(img).items():
                expected[str(_write(root / kind / f"{k:02d}_{name}", data))] = str(orig)
    report = check_data(str(root), workers=1)
    found = {p.path: p.extra["duplicate_of"] for p in report.problems if p.category == "near_duplicate"}
    for kind in originals:
        for variant in ("jpeg", "x2", "x1.1", "bright"):
            copies = [c for c in expected if f"/{kind}/" in c and f"_{variant}." in c]
            hits = [c for c in copies if found.get(c) == expected[c]]
            assert len(hits) >= 28, (kind, variant, len(hits), sorted(set(copies) - set(hits))[:3])
    assert set(found) <= set(expected)  # no original flagged as a copy of another original


def test_check_agrees_with_the_decoder_on_formats() -> None:
    """PPM/PGM (which training reads) are clean images to `check`, ASCII ones too, not "text"; a TGA
    named .jpg, which training skips (no magic bytes), is reported as not an image it reads."""
    import io

    from PIL import Image

    from imagerec.doctor.inspect import inspect_bytes

    ascii_pgm = b"P2\n4 4\n255\n" + b"10 20 30 40\n" * 4
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, "PPM")
    for name, data in (("a.pgm", ascii_pgm), ("b.ppm", buf.getvalue())):
        res = inspect_bytes(data, name, max_pixels=10**8, min_side=2, max_side=10**5)
        assert (res.format, res.findings) == ("PPM", []), (name, res.findings)
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, "TGA")
    res = inspect_bytes(buf.getvalue(), "photo.jpg", max_pixels=10**8, min_side=2, max_side=10**5)
    (finding,) = res.findings
    assert finding[0] == "not_an_image" and finding[1].startswith("TGA data: imagerec reads JPEG, PNG")
