"""Bundles on disk: what --overwrite may replace (only a bundle), and a manifest that checks itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from PIL import Image

from imagerec.cli import main
from imagerec.config import PreprocessConfig
from imagerec.export import export_model, export_run, load_bundle, synthetic_images
from imagerec.export.bundle import finalize_bundle
from imagerec.models import create_model
from imagerec.utils import ImageRecError, sha256_file


@pytest.fixture(scope="module")
def bundle(cnn_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "cnn"
    export_run(cnn_run, "onnx", out, parity_images=32)
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links not followed) with its sha256."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def test_overwrite_never_deletes_the_source_run(cnn_run: Path, bundle: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # QA: `export tlc --out tlc --overwrite` left imagerec.json and model.onnx; the checkpoints were gone.
    run = tmp_path / "runs" / "cnn"
    shutil.copytree(cnn_run, run)
    shutil.copytree(bundle, run / "onnx")  # a genuine bundle, but inside the run
    before = _snapshot(tmp_path)
    assert any(name.endswith(".safetensors") for name in before)
    for out, why in ((run, "it is the run being exported"), (run.parent, "it contains the run being exported")):
        assert main(["export", str(run), "--out", str(out), "--overwrite", "--parity-images", "16"]) == 2
        err = capsys.readouterr().err
        assert f"{out} already exists" in err and why in err and "nothing was deleted" in err
    assert _snapshot(tmp_path) == before
    assert sorted(tmp_path.rglob(".*")) == []  # no staging or .old folder left either
    # a bundle kept in the run's own folder is a bundle: exporting again replaces it, and only it
    assert main(["export", str(run), "--out", str(run / "onnx"), "--overwrite", "--parity-images", "16"]) == 0
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if "/onnx/" not in k} == {k: v for k, v in before.items() if "/onnx/" not in k}


def test_overwrite_replaces_only_a_bundle(cnn_run: Path, bundle: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"  # QA: 500 images and notes.txt became imagerec.json + model.onnx, rc 0
    images.mkdir()
    for k in range(3):
        Image.new("L", (28, 28), k * 60).save(images / f"{k}.png")
    (images / "notes.txt").write_text("labels checked by hand")
    annotated = tmp_path / "annotated"  # a bundle the user has put something of their own in
    shutil.copytree(bundle, annotated)
    (annotated / "notes.txt").write_text("shipped to the client on Monday")
    other = tmp_path / "other"  # an imagerec.json of some other kind
    other.mkdir()
    (other / "imagerec.json").write_text('{"format": "something-else", "files": {}}')
    (other / "data.csv").write_text("a,b\n")
    plain = tmp_path / "model.onnx"
    plain.write_bytes(b"my own file")
    link = tmp_path / "link"
    link.symlink_to(bundle, target_is_directory=True)
    before = _snapshot(tmp_path)
    for out, why in ((images, "it holds no imagerec.json, so it is not an imagerec bundle"),
                     (annotated, "it holds files its imagerec.json does not list (notes.txt)"),
                     (other, "its imagerec.json is not an imagerec bundle manifest"),
                     (plain, "it is a file, not a bundle folder"),
                     (link, "it is a symbolic link")):
        with pytest.raises(ImageRecError) as e:
            export_run(cnn_run, "onnx", out, parity_images=16, overwrite=True)
        assert str(e.value).startswith(f"{out} already exists") and why in str(e.value), str(e.value)
        # without --overwrite, --overwrite is not suggested for something it would not replace
        with pytest.raises(ImageRecError, match="will not replace it"):
            export_run(cnn_run, "onnx", out, parity_images=16)
    assert main(["export", str(cnn_run), "--out", str(images), "--overwrite", "--parity-images", "16"]) == 2
    assert "it holds no imagerec.json" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before and link.resolve() == bundle.resolve()
    # A bundle, even a damaged one, is replaced: exporting again is how it is mended.
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / "model.onnx").write_bytes(b"damaged")
    manifest = export_run(cnn_run, "onnx", copy, parity_images=16, overwrite=True)
    assert load_bundle(copy).manifest["runtimes"][0]["parity"]["images"] == 16 == manifest["runtimes"][0]["parity"]["images"]
    assert sorted(tmp_path.rglob(".*")) == []


def test_finalize_bundle_checks_out_again_before_replacing(tmp_path: Path) -> None:
    # The export takes a while: what is at `out` is checked again just before the rename.
    def staged(n: int) -> Path:
        tmp = tmp_path / f".staged{n}"
        tmp.mkdir()
        (tmp / "model.onnx").write_bytes(b"model %d" % n)
        return tmp

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ImageRecError, match="holds no imagerec.json"):
        finalize_bundle(staged(1), out, {"runtimes": []}, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()  # an empty folder holds nothing to lose: replaced
    finalize_bundle(staged(2), out, {"runtimes": []}, overwrite=True)
    finalize_bundle(staged(3), out, {"runtimes": []}, overwrite=True)  # and then a bundle
    assert sorted(p.name for p in out.iterdir()) == ["imagerec.json", "model.onnx"]
    assert (out / "model.onnx").read_bytes() == b"model 3"


def test_edited_manifest_is_refused(bundle: Path, tmp_path: Path, digit_pngs: list[Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    # QA: reversing preprocess.class_names made predict print other labels, silently.
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    mpath = copy / "imagerec.json"
    manifest = json.loads(mpath.read_text())
    mpath.write_text(json.dumps(dict(reversed(manifest.items())), indent=4))  # layout and key order are no edit
    assert load_bundle(copy).pre.class_names == tuple(manifest["class_names"])
    manifest["preprocess"]["class_names"].reverse()
    manifest["class_names"].reverse()  # consistent with itself: only the manifest's own hash tells
    mpath.write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ImageRecError, match=r"imagerec\.json has been edited; export the bundle again"):
        load_bundle(copy)
    assert main(["predict", str(copy), str(digit_pngs[0]), "--format", "json"]) == 2
    out = capsys.readouterr()
    assert "imagerec.json has been edited" in out.err and "{" not in out.out


def _legacy(bundle: Path, folder: Path) -> tuple[Path, dict]:
    """A copy of `bundle` as an imagerec before manifest_sha256 and output.classes wrote it."""
    shutil.copytree(bundle, folder)
    manifest = json.loads((folder / "imagerec.json").read_text())
    manifest.pop("manifest_sha256", None)
    manifest["output"].pop("classes", None)
    (folder / "imagerec.json").write_text(json.dumps(manifest, indent=2))
    return folder, manifest


def test_bundle_from_an_older_imagerec_loads_with_one_warning(bundle: Path, tmp_path: Path) -> None:
    assert json.loads((bundle / "imagerec.json").read_text())["output"].get("classes") == 10
    old, manifest = _legacy(bundle, tmp_path / "old")
    with pytest.warns(UserWarning, match="has no manifest_sha256 .* export the bundle again to add one") as seen:
        loaded = load_bundle(old)
    assert len(seen) == 1 and loaded.pre.class_names == tuple(manifest["class_names"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per bundle
        load_bundle(old)


@pytest.mark.filterwarnings("ignore:.*has no manifest_sha256")
def test_manifest_fields_must_agree(bundle: Path, tmp_path: Path) -> None:
    # Checked on every manifest, sealed or not: an older bundle edited by hand is caught too.
    def reverse_top(m: dict) -> None:
        m["class_names"].reverse()

    def drop_a_class(m: dict) -> None:
        m["output"]["classes"] = 10
        m["class_names"].pop()
        m["preprocess"]["class_names"].pop()

    def unhashed_file(m: dict) -> None:
        m["runtimes"][0]["file"] = "other.onnx"

    def unknown_preferred(m: dict) -> None:
        m["preferred_runtime"] = "onnx-bf16"

    cases = ((reverse_top, r"class_names \[9, 8, 7, 6, ... 10 in all\] disagree with preprocess.class_names \[0, 1, 2, 3"),
             (drop_a_class, "the model outputs 10 classes but preprocess.class_names has 9"),
             (unhashed_file, "runtime 'onnx-fp32' uses other.onnx, which is not among its hashed files"),
             (unknown_preferred, "preferred_runtime 'onnx-bf16' is not one of its runtimes"))
    for k, (edit, why) in enumerate(cases):
        folder, manifest = _legacy(bundle, tmp_path / f"b{k}")
        edit(manifest)
        (folder / "imagerec.json").write_text(json.dumps(manifest))
        with pytest.raises(ImageRecError, match=f"imagerec.json contradicts itself: .*{why}.*export the bundle again"):
            load_bundle(folder)


@pytest.mark.filterwarnings("ignore:.*has no manifest_sha256")
def test_a_manifest_of_the_wrong_shape_is_damage_not_a_traceback(bundle: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # QA: format_version "1.0" crashed read_manifest (ValueError from int()), before the hash check;
    # an unsealed manifest whose `files` was a list crashed verify_bundle (AttributeError: .items()).
    def version_text(m: dict) -> None:
        m["format_version"] = "1.0"

    def files_as_list(m: dict) -> None:
        m["files"] = list(m["files"])

    def file_entry_not_a_table(m: dict) -> None:
        m["files"]["model.onnx"] = "0" * 64

    cases = ((version_text, r"format_version '1.0' is not a whole number; the bundle is damaged: export it again"),
             (files_as_list, "contradicts itself: files is not a table of file names"),
             (file_entry_not_a_table, "contradicts itself: files is not a table of file names"))
    for k, (edit, why) in enumerate(cases):
        folder, manifest = _legacy(bundle, tmp_path / f"b{k}")
        edit(manifest)
        (folder / "imagerec.json").write_text(json.dumps(manifest))
        with pytest.raises(ImageRecError, match=why):
            load_bundle(folder)
        assert main(["predict", str(folder), str(tmp_path)]) == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_export_refuses_a_model_whose_outputs_do_not_match_the_class_names(tmp_path: Path) -> None:
    model = create_model("cnn", num_classes=10, in_chans=1, img_size=28)
    pre = PreprocessConfig(28, 1, (0.5,), (0.25,), 28, tuple(f"c{i}" for i in range(9)))
    with pytest.raises(ImageRecError, match="the model outputs 10 classes but its preprocessing config names 9"):
        export_model(model, pre, "onnx", tmp_path / "b", images=synthetic_images(pre, n=4), timing_seconds=0)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_on_a_full_disk_names_the_bundle_and_leaves_nothing(fmt: str, tmp_path: Path) -> None:
    """QA: with a file size limit (as a full disk) torchscript aborted the process (SIGABRT, a C++
    stack trace) and left `.NAME.partial-PID`; onnx said "cannot export this model ... try
    --format torchscript". Both are the disk's fault: one ImageRecError naming the bundle."""
    out = tmp_path / "b"
    script = textwrap.dedent(f"""
        import resource, signal
        from imagerec.config import PreprocessConfig
        from imagerec.export import export_model, synthetic_images
        from imagerec.models import create_model
        from imagerec.utils import ImageRecError
        model = create_model("cnn", num_classes=10, in_chans=1, img_size=28)  # ~400 KB of weights
        pre = PreprocessConfig(28, 1, (0.5,), (0.25,), 28, tuple(str(i) for i in range(10)))
        images = synthetic_images(pre, n=4)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            export_model(model, pre, {fmt!r}, {str(out)!r}, images=images, timing_seconds=0)
        except ImageRecError as e:
            print("error:", e)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # not -6 (SIGABRT)
    assert proc.stdout.startswith(f"error: cannot write the export {out}: File too large;"), proc.stdout + proc.stderr[-2000:]
    assert "cannot export this model" not in proc.stdout and len(proc.stdout.strip().splitlines()) == 1
    assert sorted(tmp_path.iterdir()) == []  # no bundle and no staging folder


def test_export_removes_staging_folders_of_killed_exports(tmp_path: Path) -> None:
    """An export killed with -9 leaves `.NAME.partial-PID`; the next export to that output removes
    it, and leaves alone the one of an export still running."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed, running = tmp_path / f".b.partial-{dead.pid}", tmp_path / f".b.partial-{os.getppid()}"
    for folder in (killed, running):
        folder.mkdir()
        (folder / "model.ts").write_bytes(b"half")
    model = create_model("cnn", num_classes=10, in_chans=1, img_size=28)
    pre = PreprocessConfig(28, 1, (0.5,), (0.25,), 28, tuple(str(i) for i in range(10)))
    export_model(model, pre, "torchscript", tmp_path / "b", images=synthetic_images(pre, n=4), timing_seconds=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "b"]


def test_export_puts_back_a_bundle_an_interrupted_overwrite_moved_aside(tmp_path: Path) -> None:
    """`export --overwrite` moves the old bundle to `.NAME.old-PID` and then renames the new one into
    place; a kill between the two renames left no bundle at NAME. predict names the folder holding
    it, and the next export to NAME puts it back first (a leftover beside an existing NAME goes)."""
    from imagerec.predict import check_model_path

    model = create_model("cnn", num_classes=10, in_chans=1, img_size=28)
    pre = PreprocessConfig(28, 1, (0.5,), (0.25,), 28, tuple(str(i) for i in range(10)))
    export_model(model, pre, "torchscript", tmp_path / "b", images=synthetic_images(pre, n=4), timing_seconds=0)
    before = _snapshot(tmp_path / "b")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside, new = tmp_path / f".b.old-{dead.pid}", tmp_path / f".b.partial-{dead.pid}"
    os.replace(tmp_path / "b", aside)  # the state between the two renames
    shutil.copytree(aside, new)
    with pytest.raises(ImageRecError, match=rf"model not found: .*b .*{aside.name} holds the bundle an interrupted"):
        check_model_path(tmp_path / "b")
    with pytest.raises(ImageRecError, match="already exists"):  # put back, and not replaced without --overwrite
        export_model(model, pre, "torchscript", tmp_path / "b", images=synthetic_images(pre, n=4), timing_seconds=0)
    assert _snapshot(tmp_path / "b") == before and not aside.exists()
    export_model(model, pre, "torchscript", tmp_path / "b", images=synthetic_images(pre, n=4), timing_seconds=0,
                 overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # the killed export's staging folder went too
    shutil.copytree(tmp_path / "b", aside)  # killed after the second rename: the old copy is a leftover
    export_model(model, pre, "torchscript", tmp_path / "b", images=synthetic_images(pre, n=4), timing_seconds=0,
                 overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
