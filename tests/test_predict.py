"""imagerec.predict: the Predictor's inputs (PIL images, paths, bytes, folders) and its pixel limit.

A tiny untrained `mlp` run is written straight to a checkpoint, so these tests train nothing.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagerec.cli import main
from imagerec.config import PreprocessConfig, TrainConfig
from imagerec.engine.checkpoint import save_checkpoint
from imagerec.models import create_model
from imagerec.predict import Predictor, expand_paths


def write_run(root: Path, max_pixels: int | None = None, size: int = 16) -> Path:
    """A run directory with an untrained 3-channel `mlp` over `size` px; `max_pixels` None: a
    train_config without the key (as a run of an older imagerec has none)."""
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=3, in_chans=3, img_size=size)
    pre = PreprocessConfig(size, 3, (0.5,) * 3, (0.25,) * 3, size + 2, ("a", "b", "c"))
    cfg = TrainConfig(data="somewhere", **({} if max_pixels is None else {"max_pixels": max_pixels})).to_dict()
    if max_pixels is None:
        del cfg["max_pixels"]
    root.mkdir(parents=True, exist_ok=True)
    save_checkpoint(root / "best", model, {"model": "mlp", "model_kwargs": {"in_chans": 3, "img_size": size},
                                           "preprocess": pre.to_dict(), "train_config": cfg})
    return root


def textured(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: a picture whose orientation and scale the model input shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) % 64 * 4.0], -1) + rng.normal(0, 10, (h, w, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def exif_rotated(path: Path, fmt: str) -> Path:
    """An upright picture stored rotated, with EXIF orientation 6 ("rotate 90 degrees clockwise to display")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    textured(40, 30).transpose(Image.Transpose.ROTATE_90).save(path, fmt, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_pil_image_is_prepared_like_its_path_and_bytes(tmp_path: Path, fmt: str) -> None:
    path = exif_rotated(tmp_path / f"rotated.{fmt.lower()}", fmt)
    predictor = Predictor.from_run(write_run(tmp_path / "run"))
    from_path = predictor.preprocess(path)
    assert torch.equal(predictor.preprocess(path.read_bytes()), from_path)
    opened = Image.open(path)
    assert torch.equal(predictor.preprocess(opened), from_path)  # EXIF orientation applied, as for the path
    off = (predictor.preprocess(textured(40, 30)).float() - from_path.float()).abs().mean()
    assert off == 0 if fmt == "PNG" else off < 8  # the upright picture (JPEG: lossy)
    assert opened.size == (30, 40) and opened.getexif().get(0x0112) == 6  # the caller's image is left as it was
    by_pil, by_path = predictor.predict([Image.open(path), path])
    assert by_pil["topk"] == by_path["topk"]


def test_pil_image_input_gets_the_pixel_limit(tmp_path: Path) -> None:
    predictor = Predictor.from_run(write_run(tmp_path / "run"), max_pixels=1000)
    (row,) = predictor.predict(textured(40, 30))
    assert "40x30 = 1200 pixels exceeds the limit of 1000" in row["error"]


def test_runs_and_bundles_use_their_own_max_pixels(tmp_path: Path) -> None:
    img = tmp_path / "wide.png"
    textured(50, 40).save(img)  # 2,000 pixels
    run = write_run(tmp_path / "run", max_pixels=1500)
    assert Predictor.from_run(run).max_pixels == 1500  # as `imagerec eval` applies it
    assert "exceeds the limit of 1500" in Predictor.from_run(run).predict(img)[0]["error"]
    assert "error" not in Predictor.from_run(run, max_pixels=2000).predict(img)[0]  # given: it wins
    old = write_run(tmp_path / "old", max_pixels=None)  # no max_pixels recorded: PIL's threshold
    assert Predictor.from_run(old).max_pixels == 89_478_485


def test_predict_cli_max_pixels_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "wide.png"
    textured(50, 40).save(img)
    run = write_run(tmp_path / "run", max_pixels=1500)
    assert main(["predict", str(run), str(img), "--format", "json"]) == 1
    assert "exceeds the limit of 1500" in capsys.readouterr().err
    assert main(["predict", str(run), str(img), "--format", "json", "--max-pixels", "2000"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in ("a", "b", "c")
    assert main(["predict", str(run), str(img), "--max-pixels", "0"]) == 2
    assert "--max-pixels must be at least 1, got 0" in capsys.readouterr().err


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height 1-bit pixels with one tiny IDAT: bytes, not gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_an_image_over_the_limit_is_one_line_without_pils_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(_png_header_only(10_000, 9_000))  # 90M pixels: over PIL's own 89.5M warning threshold
    run = write_run(tmp_path / "run")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["predict", str(run), str(big)]) == 1
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    err = capsys.readouterr().err
    assert "10000x9000 = 90000000 pixels exceeds the limit of 89478485" in err and "Warning" not in err


def test_folders_list_every_image_file_single_file_predict_takes(tmp_path: Path) -> None:
    """PPM/PGM/PBM are read everywhere; a TGA (no magic bytes: refused everywhere) in a folder is
    listed and reported with the reason, as the file itself is, never silently left out."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    pic = textured(20, 20)
    pic.save(folder / "a.ppm")
    pic.convert("L").save(folder / "b.pgm")
    pic.convert("1").save(folder / "c.pbm")
    pic.save(folder / "d.tga")
    pic.save(folder / "e.png")
    (folder / "notes.txt").write_text("not an image")
    listed = expand_paths([folder])
    assert sorted(Path(p).name for p in listed) == ["a.ppm", "b.pgm", "c.pbm", "d.tga", "e.png"]
    rows = {Path(r["path"]).name: r for r in Predictor.from_run(write_run(tmp_path / "run")).predict(listed)}
    assert all("label" in rows[n] for n in ("a.ppm", "b.pgm", "c.pbm", "e.png"))
    assert rows["a.ppm"]["topk"] == rows["e.png"]["topk"]  # lossless both: the same pixels
    assert "not an image file imagerec reads" in rows["d.tga"]["error"] and "TGA" in rows["d.tga"]["error"]
    buf = io.BytesIO()
    pic.save(buf, "TGA")
    (single,) = Predictor.from_run(write_run(tmp_path / "run")).predict(buf.getvalue())
    assert "not an image file imagerec reads" in single["error"]


def test_eval_of_the_same_folder_says_which_image_files_it_leaves_out(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from imagerec.engine.evaluate import evaluate_run

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        textured(20, 20, seed=ord(cls)).save(tmp_path / "data" / cls / "x.ppm")
    textured(20, 20).save(tmp_path / "data" / "a" / "y.tga")
    with caplog.at_level("WARNING", logger="imagerec"):
        m = evaluate_run(write_run(tmp_path / "run"), str(tmp_path / "data"), split="all", write=False)
    assert m["num_samples"] == 2 and m["skipped_files"] == []  # both PPMs evaluated
    assert "left out 1 image file(s) of formats imagerec does not read (1 .tga)" in caplog.text
