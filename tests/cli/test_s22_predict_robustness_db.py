"""`imagerec robustness` reads `store:NAME` DATA from the store `--db` names, as eval and predict do."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from imagerec.cli import main


def test_robustness_reads_store_data_from_db(tmp_path: Path, untrained_run: Callable[..., Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = untrained_run(tmp_path / "run")  # classes a, b; 3x16x16
    for label, colour in (("a", (250, 0, 0)), ("b", (0, 0, 250))):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (16, 16), tuple(c // (k + 1) for c in colour)).save(tmp_path / "photos" / label / f"{k}.png")
    db = str(tmp_path / "store.db")
    assert main(["ingest", str(tmp_path / "photos"), "--dataset", "pics", "--db", db]) == 0
    capsys.readouterr()
    # before: "unrecognized arguments: --db", and without it the default store has no dataset 'pics'
    code = main(["robustness", str(run), "store:pics", "--db", db, "--corruptions", "fog", "--severities", "1",
                 "--attacks", "none", "--format", "json"])
    out = capsys.readouterr().out
    assert code == 0
    r = json.loads(out)
    assert (r["data"], r["num_images"]) == ("store:pics", 4)
