"""export-dataset writes every stored format under a name the readers list, so the export reads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagerec.data import read_data
from imagerec.store import export_dataset, export_dataset_command, ingest, open_store


def test_pgm_and_ppm_images_export_under_names_that_read_back(store_url: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    rows = []
    for k, label in enumerate(["cat", "dog"]):
        (src / label).mkdir(parents=True)
        # a folder's .pgm file, and a manifest's file with no extension at all (PPM bytes)
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(src / label / f"{k}.pgm")
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(src / label / f"raw{k}", "PPM")
        rows += [{"path": f"{label}/{k}.pgm", "label": label}, {"path": f"{label}/raw{k}", "label": label}]
    (src / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    with open_store(store_url) as store:
        assert ingest(store, str(src / "m.jsonl"), "pnm", progress=False).added == 4
        assert export_dataset(store, "pnm", out) == 4
    names = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert "0.pgm" in names and "1.pgm" in names  # the original names are kept
    assert sorted(Path(n).suffix for n in names) == [".pgm", ".pgm", ".ppm", ".ppm"]
    spec = read_data(str(out))
    assert spec.class_names == ["cat", "dog"]
    assert spec.counts() == {"train": 4}


def test_export_of_a_multi_label_dataset_says_to_train_on_its_manifest(
    store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(2):
        Image.fromarray(np.full((8, 8), 100 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "m.jsonl").write_text('{"path": "0.png", "labels": ["a", "b"]}\n{"path": "1.png", "labels": ["b"]}\n')
    with open_store(store_url) as store:
        ingest(store, str(tmp_path / "m.jsonl"), "ml", progress=False)
    assert export_dataset_command("ml", str(tmp_path / "out"), db=store_url) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"every image's labels are in {tmp_path / 'out' / 'manifest.jsonl'}; train on that file" in out
    assert read_data(str(tmp_path / "out" / "manifest.jsonl")).multi_label
