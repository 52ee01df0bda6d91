"""QA pass 6 (eval, robustness, runs) at the command line: a robustness summary when the clean
accuracy is 0; names and paths printed as written, never as Rich markup; `runs --compare` ids no
store column can hold; robustness flags that name nothing or mix 'all'/'none' with names; `--split
test` of DATA with a train/ split but no test images.

The run is a copy of the session's `cnn_run` (tests/conftest.py: a `cnn` on mnist-mini); images are
real mnist-mini digits written as PNGs.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image

from imagerec.cli import main
from imagerec.data import read_data
from imagerec.predict import load


def one_error_line(code: int, out: str, err: str) -> str:
    """The single 'error: ...' line of a clean failure (exit 2, nothing on stdout, no traceback)."""
    assert code == 2 and out == "", (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def digit_images(n: int) -> list[tuple[Image.Image, str]]:
    """The first `n` mnist-mini test digits as images, with their classes."""
    spec = read_data("mnist-mini")
    return [(Image.fromarray(spec.arrays["test"][it.source.index]), spec.class_names[it.target])
            for it in spec.splits["test"][:n]]


@pytest.fixture
def run(cnn_run: Path, copy_run: Callable[..., Path], tmp_path: Path) -> Path:
    """A copy of the session's run in a folder whose name holds Rich markup: the commands write into it."""
    return copy_run(cnn_run, tmp_path / "run[lr=0.1]")


# --- bug 3: robustness when the clean accuracy is 0 -----------------------------------------------


def test_robustness_table_when_the_model_gets_every_image_wrong(run: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Digits the model (fp32, as robustness runs it) calls '0', filed under '1': clean accuracy exactly 0.
    images = [im for im, _ in digit_images(120)]
    labels = [p["label"] for p in load(run, device="cpu", precision="fp32").predict(images, top_k=1)]
    zeros = [im for im, label in zip(images, labels, strict=True) if label == "0"][:8]
    assert len(zeros) == 8
    (tmp_path / "wrong" / "1").mkdir(parents=True)
    for k, im in enumerate(zeros):
        im.save(tmp_path / "wrong" / "1" / f"{k}.png")
    code = main(["robustness", str(run), str(tmp_path / "wrong"), "--corruptions", "contrast", "--severities", "1",
                 "--attacks", "none"])
    out = capsys.readouterr().out
    assert code == 0, out
    r = json.loads((run / "robustness-all.json").read_text())
    assert (r["clean_accuracy"], r["relative_drop"]) == (0.0, None)
    mca = r["mean_corruption_accuracy"]
    assert (f"clean accuracy 0.00% on 8 all images of {tmp_path / 'wrong'} (seed 0); mean corruption accuracy "
            f"{mca:.2%} (relative drop n/a: clean accuracy is 0)") in out


# --- bug 4: names and paths are printed as written ------------------------------------------------


def test_names_and_paths_with_brackets_are_printed_as_written(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Class names with [...] and [/...] (README: any character), a run folder 'run[lr=0.1]' and DATA under
    'held[/out]' (a folder 'held[' holding 'out]'): shown as written, and no MarkupError after the work."""
    names = {"0": "cat [wild]", "1": "[/x]", "2": "[bold]two"}
    for name in ("best.json", "last.json"):
        meta = json.loads((run / name).read_text())
        meta["preprocess"]["class_names"] = [names.get(c, c) for c in meta["preprocess"]["class_names"]]
        (run / name).write_text(json.dumps(meta))
    data = tmp_path / "held[" / "out]"
    data.mkdir(parents=True)
    rows = []
    for k, (im, c) in enumerate((im, c) for im, c in digit_images(60) if c in names):
        im.save(data / f"{k}.png")
        rows.append(f"{k}.png,{names[c]}\n")
    (data / "m.csv").write_text("path,label\n" + "".join(rows))
    monkeypatch.chdir(tmp_path)  # relative paths: a short table title, on one line
    manifest = "held[/out]/m.csv"

    code = main(["eval", "run[lr=0.1]", manifest])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0].strip() == f"run[lr=0.1] on {manifest} [all]"
    cells = {line.split("│")[1].strip() for line in out.splitlines() if line.count("│") >= 3}
    assert set(names.values()) <= cells, out
    assert "written: run[lr=0.1]/eval-all.json" in out and (run / "eval-all.json").is_file()

    code = main(["robustness", "run[lr=0.1]", manifest, "--corruptions", "fog", "--severities", "1", "--attacks", "none"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"images of {manifest} (seed 0)" in out
    assert "written: run[lr=0.1]/robustness-all.json" in out


# --- bug 5: runs --compare ids past the store's integer column -------------------------------------


def test_compare_id_past_sqlite_integers_is_a_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "store.db"
    for ids in (["99999999999999999999"], ["-9223372036854775809"]):
        line = one_error_line(main(["runs", "--db", str(db), "--compare", *ids]), *capsys.readouterr())
        assert line == f"error: no run with id {ids[0]} in the store sqlite:///{db}; list them with: imagerec runs"
    line = one_error_line(main(["runs", "--db", str(db), "--compare", "9223372036854775807"]), *capsys.readouterr())
    assert line.startswith("error: no run with id 9223372036854775807 in the store")  # the largest: asked for


@pytest.fixture
def pg_store(postgres_scratch: Callable[[str, str], AbstractContextManager[str]]) -> Iterator[str]:
    """A store URL in a fresh schema of the PostgreSQL `test` database (dropped afterwards)."""
    schema = f"s_{secrets.token_hex(6)}"
    with postgres_scratch(f"CREATE SCHEMA {schema}", f"DROP SCHEMA IF EXISTS {schema} CASCADE") as admin_url:
        url = sa.make_url(admin_url)
        yield f"postgresql://{url.username}@{url.host}:{url.port}/{url.database}?options=-csearch_path%3D{schema}"


def test_compare_id_past_postgresql_integers_is_a_missing_run(pg_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    for big in ("3000000000", "2147483648", "-2147483649"):  # runs.id is INTEGER: 32-bit on PostgreSQL
        line = one_error_line(main(["runs", "--db", pg_store, "--compare", "1", big]), *capsys.readouterr())
        assert line.startswith(f"error: no run with id {big} in the store postgresql"), line
        assert line.endswith("; list them with: imagerec runs")
    line = one_error_line(main(["runs", "--db", pg_store, "--compare", "2147483647"]), *capsys.readouterr())
    assert line.startswith("error: no run with id 2147483647 in the store postgresql")  # the largest: asked for


# --- bug 7: robustness flags ----------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--corruptions", "all,fog"], "'all' cannot be combined with names (all, fog): use --corruptions all, or a list of names"),
    (["--corruptions", "none,fog"], "'none' cannot be combined with names (none, fog): use --corruptions none"),
    (["--attacks", "fgsm,none"], "'none' cannot be combined with names (fgsm, none): use --attacks none"),
    (["--severities", "5..1"], "--severities '5..1' is an empty range: write it low to high, 1..5"),
    (["--severities", ""], "--severities '' names no severity: write 1..5, 3 or 1,3,5"),
    (["--severities", ","], "--severities ',' names no severity"),
    (["--corruptions", ""], "--corruptions '' names nothing: use all, none or a comma list"),
    (["--corruptions", " , "], "--corruptions ' , ' names nothing"),
    (["--attacks", ""], "--attacks '' names nothing: use fgsm,pgd, fgsm, pgd or none"),
])
def test_robustness_flags_that_name_nothing_or_mix_all_and_none(cnn_run: Path, capsys: pytest.CaptureFixture[str],
                                                                args: list[str], message: str) -> None:
    line = one_error_line(main(["robustness", str(cnn_run), *args]), *capsys.readouterr())
    assert line.startswith(f"error: {message}"), line


# --- bug 6: --split test of DATA with train/ but no test images -----------------------------------


def test_split_test_of_data_without_test_images_is_refused_and_the_default_says_what_it_evaluates(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    held = tmp_path / "held"
    for k, (im, c) in enumerate(digit_images(12)):
        (held / "train" / c).mkdir(parents=True, exist_ok=True)
        (held / "test" / c).mkdir(parents=True, exist_ok=True)  # empty
        im.save(held / "train" / c / f"{k}.png")
    for command in (["eval"], ["robustness", "--attacks", "none", "--corruptions", "none"]):
        line = one_error_line(main([command[0], str(run), str(held), "--split", "test", *command[1:]]), *capsys.readouterr())
        assert line.startswith(f"error: {held} has no 'test' split (its test/ folder holds no images); it has: train, val"), line
    with caplog.at_level(logging.WARNING, logger="imagerec"):  # on stderr, as WARNING: ... (logging, set up by main)
        code = main(["eval", str(run), str(held), "--format", "json"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["split"] == "all"
    assert f"{held} has no test images (its test/ folder holds no images): evaluating all 12 images" in caplog.text


def test_train_takes_data_from_a_config_file_when_no_data_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # QA: a --config file's `data:` key (every run's config.yaml has one) was accepted, then ignored:
    # `train --config RUN/config.yaml` said DATA was missing. DATA on the command line still wins.
    import imagerec.engine.run as engine_run

    seen: list[str] = []

    class Stop(Exception):
        pass

    def fake_train(cfg, *a, **k):  # type: ignore[no-untyped-def]
        seen.append(cfg.data)
        raise Stop

    monkeypatch.setattr(engine_run, "train", fake_train)
    cfg = tmp_path / "my.yaml"
    cfg.write_text("data: from-the-file\nepochs: 1\n")
    with pytest.raises(Stop):
        main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")])
    with pytest.raises(Stop):
        main(["train", "on-the-command-line", "--config", str(cfg), "--out", str(tmp_path / "r")])
    assert seen == ["from-the-file", "on-the-command-line"]
    cfg.write_text("epochs: 1\n")  # no data anywhere: still one clear line
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "a --config file with a data: key" in capsys.readouterr().err
