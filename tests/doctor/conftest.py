"""A small image folder seeded with every kind of bad file the doctor knows, built from real CIFAR images."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CIFAR_JPG = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
N_REAL = 60


def real_images(n: int = N_REAL) -> list[bytes]:
    """The first n CIFAR-10 JPEG files of the shared archive, as bytes (real photos, 32x32)."""
    if not CIFAR_JPG.is_file():
        pytest.skip(f"shared dataset not found: {CIFAR_JPG}")
    out: list[bytes] = []
    with tarfile.open(CIFAR_JPG, "r:gz") as tf:
        for m in tf:
            if m.isfile() and m.name.endswith(".jpg"):
                out.append(tf.extractfile(m).read())  # type: ignore[union-attr]
                if len(out) == n:
                    break
    return out


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG header declaring width x height with one tiny IDAT: a few bytes, not 400 MB."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def build_dataset(root: Path) -> dict[str, object]:
    """Write the planted dataset under root; return {"expect": {relpath: category...}, "clean": [relpaths]}."""
    real = real_images()
    imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b in real]
    files: dict[str, bytes] = {}
    expect: dict[str, set[str]] = {}

    def plant(rel: str, data: bytes, *categories: str) -> None:
        files[rel] = data
        expect[rel] = set(categories)

    clean: list[str] = []
    for i in range(24):  # the big class
        clean.append(f"train/cat/clean_{i:02d}.jpg")
        files[clean[-1]] = real[i]
    for i in range(2):  # the small class: 24 + planted vs 3 -> imbalance > 3
        clean.append(f"train/bird/clean_{i:02d}.jpg")
        files[clean[-1]] = real[24 + i]
    for i in range(3):
        clean.append(f"train/dog/clean_{i:02d}.jpg")
        files[clean[-1]] = real[26 + i]
    for i in range(3):
        clean.append(f"train/golden_retriever/clean_{i:02d}.jpg")
        files[clean[-1]] = real[29 + i]
    for i in range(2):
        clean.append(f"val/cat/clean_{i:02d}.jpg")
        files[clean[-1]] = real[32 + i]
        clean.append(f"test/cat/clean_{i:02d}.jpg")
        files[clean[-1]] = real[34 + i]
    clean.append("test/bird/clean_00.png")
    files[clean[-1]] = encode(imgs[36], "PNG")

    big = imgs[37].resize((128, 128), Image.Resampling.BICUBIC)
    plant("train/cat/truncated.jpg", encode(big, "JPEG", quality=90)[:1500], "truncated")
    plant("train/cat/truncated.png", encode(big, "PNG")[:-200], "truncated")
    bad = bytearray(encode(imgs[38], "PNG"))
    idat = bad.find(b"IDAT")
    (length,) = struct.unpack(">I", bad[idat - 4 : idat])
    bad[idat + 4 + length] ^= 0xFF  # first CRC byte of the IDAT chunk
    plant("train/cat/bad_crc.png", bytes(bad), "corrupt")
    plant("train/cat/zero.jpg", b"", "zero_byte")
    plant("train/cat/text.jpg", b"this is not a photo\nit is a note somebody saved as .jpg\n" * 5, "not_an_image")
    plant("train/cat/document.png", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not_an_image")
    rng = np.random.default_rng(0)
    plant("train/cat/garbage.png", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "corrupt")
    plant("train/cat/bomb.png", bomb_png(20000, 20000), "decompression_bomb")
    plant("train/cat/cmyk.jpg", encode(imgs[39].convert("CMYK"), "JPEG", quality=90), "cmyk")
    gray16 = (np.asarray(imgs[40].convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    plant("train/cat/sixteen.png", encode(Image.fromarray(gray16), "PNG"), "sixteen_bit")
    exif = Image.Exif()
    exif[0x0112] = 6
    plant("train/cat/rotated.jpg", encode(imgs[41], "JPEG", quality=90, exif=exif.tobytes()), "exif_rotation")
    frames = [imgs[42], imgs[43], imgs[44]]
    plant("train/cat/animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0), "multi_frame", "palette")
    rgba = imgs[45].convert("RGBA")
    rgba.putalpha(128)
    plant("train/cat/alpha.png", encode(rgba, "PNG"), "alpha")
    plant("train/cat/palette.png", encode(imgs[46].convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "palette")
    plant("train/cat/png_named.jpg", encode(imgs[47], "PNG"), "wrong_extension")
    plant("train/cat/tiny.png", encode(imgs[48].resize((4, 4)), "PNG"), "tiny")
    plant("train/cat/wide.png", encode(Image.new("L", (12000, 16), 90), "PNG"), "huge")
    plant("train/cat/dup_a.jpg", real[49])
    plant("train/cat/dup_b.jpg", real[49], "exact_duplicate")
    plant("train/bird/leak.jpg", real[50])
    plant("test/bird/leak_copy.jpg", real[50], "split_leakage")
    plant("train/cat/near_src.jpg", real[51])
    plant("val/cat/near_copy.jpg", encode(imgs[51].resize((96, 96), Image.Resampling.BICUBIC), "JPEG", quality=85), "split_leakage")
    plant("train/dog/near_a.png", encode(imgs[52], "PNG"))
    plant("train/dog/near_b.jpg", encode(imgs[52].resize((64, 64), Image.Resampling.BICUBIC), "JPEG", quality=85), "near_duplicate")
    plant("train/golden_retreiver/only.jpg", real[53])  # the typo class (its folder is reported)
    plant("val/Dog/capital.jpg", real[54])  # 'Dog' vs 'dog'
    plant("vaidation/cat/odd.jpg", real[55])  # an odd split folder: ignored by the reader
    plant("train/cat/notes.txt", b"labelled by bob, 2021\n", "non_image")
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "train" / "empty_class").mkdir(parents=True)
    folders = {
        "train/empty_class": "empty_class",
        "vaidation": "odd_split_name",
        "train/golden_retreiver": "label_typo",
        "val/Dog": "label_typo",
    }
    return {"expect": expect, "clean": clean, "folders": folders}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("doctor") / "pets"
    info = build_dataset(root)
    return root, info


@pytest.fixture
def fresh_dataset(tmp_path: Path) -> Path:
    """A private copy of the planted dataset, for tests that move files."""
    root = tmp_path / "pets"
    build_dataset(root)
    return root


@pytest.fixture(scope="session")
def cifar_jpegs() -> list[bytes]:
    """The first N_REAL CIFAR-10 JPEG files of the shared archive, as bytes."""
    return real_images()
