"""`--split` is read without regard to case or spaces, for `all` as for the split names."""

from __future__ import annotations

import pytest

from imagerec.engine.evaluate import normalize_split


@pytest.mark.parametrize("typed, name", [("ALL", "all"), (" All ", "all"), ("VAL", "val"), ("Validation", "val"),
                                         ("test", "test"), (None, None), ("extra", "extra")])
def test_split_names_ignore_case(typed: str | None, name: str | None) -> None:
    assert normalize_split(typed) == name  # 'ALL' was kept as is and refused: "has no 'ALL' split"


def test_eval_split_all_in_capitals(tmp_path, untrained_run) -> None:  # noqa: ANN001
    from PIL import Image

    from imagerec.engine.evaluate import evaluate_run

    run = untrained_run(tmp_path / "run")  # classes a, b
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.new("RGB", (16, 16), (200, 0, 0) if label == "a" else (0, 0, 200)).save(tmp_path / "data" / label / "0.png")
    m = evaluate_run(run, str(tmp_path / "data"), split="ALL", write=False)
    assert (m["split"], m["num_samples"]) == ("all", 2)
