"""Training features end to end on small real data: optimizers, schedules, early stopping,
multi-label, fine-tuning, preprocessing ops travelling with the model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import imagerec
from imagerec.config import TrainConfig, load_config_file
from imagerec.data import read_data
from imagerec.engine.callbacks import Callback
from imagerec.engine.optim import create_schedule
from imagerec.utils import ImageRecError

SMALL = {"data": "mnist-mini", "epochs": 1, "limit_train": 1024, "batch_size": 64}


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "adagrad"])
def test_every_optimizer_learns(tmp_path: Path, optimizer: str) -> None:
    r = imagerec.train(out=str(tmp_path / optimizer), optimizer=optimizer, **{**SMALL, "epochs": 2})
    hist = (tmp_path / optimizer / "history.csv").read_text().splitlines()
    first, last = (dict(zip(hist[0].split(","), row.split(","), strict=True)) for row in (hist[1], hist[-1]))
    assert float(last["train_loss"]) < float(first["train_loss"])
    assert r.metrics["test"]["accuracy"] > 0.3  # far above chance (0.1) after 32 steps


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedules_shape(schedule: str) -> None:
    f = create_schedule(TrainConfig(schedule=schedule, epochs=4, warmup_epochs=1), steps_per_epoch=10)
    values = [f(s) for s in range(40)]
    assert max(values) == pytest.approx(1.0, abs=0.05)
    assert values[0] < 0.2  # every schedule warms up
    if schedule == "constant":
        assert values[-1] == 1.0
    else:
        assert values[-1] < 0.05  # and anneals to ~0


def test_early_stopping_stops_and_says_why(tmp_path: Path) -> None:
    # lr so high the val metric cannot keep improving: stops long before 8 epochs.
    r = imagerec.train(out=str(tmp_path / "es"), early_stopping=1, lr=5.0, optimizer="sgd", **{**SMALL, "epochs": 8})
    assert r.metrics["epochs_run"] < 8
    meta = json.loads((tmp_path / "es" / "last.json").read_text())
    assert meta["state"]["epochs_since_best"] >= 1


def test_multi_label_manifest_trains_with_bce_and_reports_map(tmp_path: Path) -> None:
    spec = read_data("mnist-mini")
    rows = ["path,label,split"]
    for split, key in (("train", "train"), ("test", "test")):
        for k, it in enumerate(spec.splits[split][:: 4 if split == "train" else 5]):
            digit = int(spec.class_names[it.target])
            labels = [f"d{digit}", "even" if digit % 2 == 0 else "odd"] + (["big"] if digit >= 5 else [])
            p = tmp_path / f"{key}{k}.png"
            Image.fromarray(spec.arrays[key][it.source.index]).save(p)
            rows.append(f"{p.name},{';'.join(labels)},{split}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    r = imagerec.train(data=str(tmp_path / "m.csv"), out=str(tmp_path / "ml"), epochs=3, batch_size=64)
    test = r.metrics["test"]
    assert {"map", "macro_f1", "micro_f1", "per_class"} <= set(test)
    assert test["per_class"]["even"]["ap"] > 0.8 and test["map"] > 0.5
    pred = imagerec.load(tmp_path / "ml").predict([tmp_path / "test0.png"], top_k=3)[0]
    assert "labels" in pred and all(0 <= t["score"] <= 1 for t in pred["topk"])


def test_fine_tune_from_run_with_frozen_backbone(tmp_path: Path) -> None:
    base = imagerec.train(out=str(tmp_path / "base"), **SMALL)
    r = imagerec.train(out=str(tmp_path / "ft"), pretrained=str(base.run_dir), freeze_backbone=True, **SMALL)
    a = load_file(str(tmp_path / "base" / "best.safetensors"))
    b = load_file(str(tmp_path / "ft" / "best.safetensors"))
    conv = next(k for k in a if k.endswith("weight") and a[k].ndim == 4)
    assert torch.equal(a[conv], b[conv])  # frozen backbone weights unchanged
    head = [k for k in a if k.startswith("model.head")]
    assert head and any(not torch.equal(a[k], b[k]) for k in head)
    assert r.metrics["test"]["accuracy"] > 0.5


def test_preprocessing_ops_are_saved_and_used_by_predict(tmp_path: Path) -> None:
    r = imagerec.train(out=str(tmp_path / "ops"), ops=["median:3", "clahe"], **SMALL)
    meta = json.loads((tmp_path / "ops" / "best.json").read_text())
    assert meta["preprocess"]["ops"] == ["median:3", "clahe"]
    spec = read_data("mnist-mini")
    img = Image.fromarray(spec.arrays["test"][0])
    predictor = imagerec.load(r.run_dir)
    x = predictor.preprocess(img)
    plain = torch.from_numpy(np.array(img))[None]  # np.array: a writable copy (from_numpy warns on a read-only view)
    assert x.shape == plain.shape and not torch.equal(x, plain)  # the ops ran in predict too


def test_yaml_config_file(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("epochs: 3\nmodel: mlp\nops: [median:3]\nlr: 0.01\nhflip: false\n")
    cfg = load_config_file(tmp_path / "c.yaml")
    assert (cfg.epochs, cfg.model, cfg.ops, cfg.lr, cfg.hflip) == (3, "mlp", ["median:3"], 0.01, False)
    (tmp_path / "bad.yaml").write_text("epochs: three\n")
    with pytest.raises(ImageRecError, match="'epochs' must be an integer"):
        load_config_file(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(ImageRecError, match="unknown config key 'learning_rate'"):
        load_config_file(tmp_path / "typo.yaml")
    (tmp_path / "where.yaml").write_text("data_dir: /data\n")  # a command-line flag, not a setting
    with pytest.raises(ImageRecError, match=r"'data_dir' .* is not a training setting.*--data-dir .*\$IMAGEREC_DATA"):
        load_config_file(tmp_path / "where.yaml")


def test_bad_values_are_refused_before_training(tmp_path: Path) -> None:
    for kwargs, pattern in [({"epochs": 0}, "epochs must be at least 1"), ({"optimizer": "adamw2"}, "Did you mean 'adamw'"),
                            ({"val_fraction": 1.5}, "val_fraction"), ({"ops": ["blur"]}, "unknown preprocessing op")]:
        with pytest.raises(ImageRecError, match=pattern):
            imagerec.train(out=str(tmp_path / "x"), **{**SMALL, **kwargs})


def test_cutout_reaches_the_training_batches(tmp_path: Path, monkeypatch) -> None:
    from imagerec.transforms import BatchAugment

    seen: list[tuple[int, int]] = []
    real_cut = BatchAugment._cut

    def cut(self, x):
        out = real_cut(self, x)
        seen.append((self.cutout, int((out != x).any(1).sum()) // len(x)))  # (side, pixels changed a sample)
        return out

    monkeypatch.setattr(BatchAugment, "_cut", cut)
    imagerec.train(out=str(tmp_path / "cut"), model="mlp", cutout=8, **SMALL)
    assert len(seen) == 1024 // 64  # every training batch, and only those (not validation or test)
    assert all(side == 8 and 0 < changed <= 64 for side, changed in seen)


def test_divergence_is_a_clear_error_not_a_nan_model(tmp_path: Path) -> None:
    with pytest.raises(ImageRecError, match="training diverged.*lower --lr"):
        imagerec.train(data="mnist-mini", out=str(tmp_path / "run"), model="mlp", optimizer="sgd", lr=1e12, epochs=1, limit_train=256)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_tensor_memory_is_reused_without_page_faults():
    """setup_compute (train, evaluate, predict) keeps freed memory: a 64 MB activation-sized
    tensor allocated again every step stops faulting its 16k pages in each time, once the heap
    has grown to fit the pattern (~6 steps here; glibc's default: 16k faults every step)."""
    import resource

    from imagerec.utils import setup_compute

    setup_compute()

    def step() -> None:
        torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)  # 64 MB, freed at once

    for _ in range(12):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2_000  # default glibc: ~82k


class _GrabTrainingInputs(Callback):
    """Keeps the training loader's cache (the uint8 inputs every epoch is cut from) and its items."""

    def on_fit_start(self, trainer) -> None:
        self.cache, self.items = trainer.train_loader.cache.clone(), trainer.train_loader.items


def test_ops_reach_training_on_array_data(tmp_path: Path) -> None:
    """`--op` on IDX arrays: the training inputs are what eval/predict compute for the same images
    (they used to be the raw arrays, so the op changed nothing in training and everything after)."""
    from imagerec.config import PreprocessConfig
    from imagerec.data import open_image
    from imagerec.transforms import base_transform

    small = {**SMALL, "limit_train": 256, "val_fraction": 0.02}
    grab = _GrabTrainingInputs()
    imagerec.train(out=str(tmp_path / "sobel"), ops=["sobel"], callbacks=[grab], **small)
    imagerec.train(out=str(tmp_path / "plain"), **small)
    a, b = (load_file(str(tmp_path / r / "best.safetensors")) for r in ("sobel", "plain"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    pre = PreprocessConfig.from_dict(json.loads((tmp_path / "sobel" / "best.json").read_text())["preprocess"])
    spec = read_data("mnist-mini")
    eval_t = base_transform(pre)
    for i in (0, 7, len(grab.items) - 1):
        assert torch.equal(grab.cache[i], eval_t(open_image(grab.items[i].source, 1, spec.arrays)))


def test_fine_tune_from_a_run_prepares_inputs_as_that_run_did(tmp_path: Path) -> None:
    """--pretrained RUN_DIR: the source run's mean/std and ops, not ImageNet's (its weights expect them)."""
    small = {**SMALL, "limit_train": 128, "val_fraction": 0.02}
    imagerec.train(out=str(tmp_path / "base"), ops=["median:3"], **small)
    imagerec.train(out=str(tmp_path / "ft"), pretrained=str(tmp_path / "base"), **small)
    src, ft = (json.loads((tmp_path / r / "best.json").read_text())["preprocess"] for r in ("base", "ft"))
    assert src["mean"] != [0.449] and (ft["mean"], ft["std"], ft["ops"]) == (src["mean"], src["std"], ["median:3"])
    assert json.loads((tmp_path / "ft" / "best.json").read_text())["train_config"]["ops"] == ["median:3"]
    # ops given for the fine-tune are kept; the normalisation still comes from the source
    imagerec.train(out=str(tmp_path / "ft2"), pretrained=str(tmp_path / "base"), ops=["clahe"], **small)
    ft2 = json.loads((tmp_path / "ft2" / "best.json").read_text())["preprocess"]
    assert (ft2["mean"], ft2["ops"]) == (src["mean"], ["clahe"])


def test_yaml_scientific_notation_is_a_number(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads 1e-3 and 5e-4, without a dot, as strings.
    (tmp_path / "sci.yaml").write_text("lr: 1e-3\nweight_decay: 5e-4\nlabel_smoothing: 0\n")
    cfg = load_config_file(tmp_path / "sci.yaml")
    assert (cfg.lr, cfg.weight_decay, cfg.label_smoothing) == (0.001, 0.0005, 0.0)
    (tmp_path / "word.yaml").write_text("lr: fast\n")
    with pytest.raises(ImageRecError, match="'lr' must be a number, got 'fast'"):
        load_config_file(tmp_path / "word.yaml")


@pytest.mark.parametrize("schedule", ["onecycle", "triangle", "cosine"])
def test_warmup_epochs_sets_every_schedules_warm_up(schedule: str) -> None:
    def peak_step(**kw: float) -> int:
        f = create_schedule(TrainConfig(schedule=schedule, epochs=4, **kw), steps_per_epoch=10)
        values = [f(s) for s in range(40)]
        return int(np.argmax(values))

    default = {"onecycle": 10, "triangle": 9, "cosine": 10}[schedule]  # 25%, 23% of the steps, one epoch
    assert peak_step() == default
    assert peak_step(warmup_epochs=2) == 20
    assert peak_step(warmup_epochs=0.5) == 5


def test_limit_train_is_stratified_and_seeded(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    from imagerec.engine.data_prep import limit_items as _limit

    items = read_data("mnist-mini").splits["train"]
    subset = _limit(items, 12, seed=0)
    counts = np.bincount([it.target for it in subset], minlength=10)
    assert len(subset) == 12 and counts.min() == 1 and counts.max() == 2  # every class, none twice over
    assert subset == _limit(items, 12, seed=0) and subset != _limit(items, 12, seed=1)
    big = np.bincount([it.target for it in _limit(items, 1000, seed=0)], minlength=10)
    share = np.bincount([it.target for it in items], minlength=10) * 1000 / len(items)
    assert np.abs(big - share).max() < 1  # each class its share, rounded
    # fewer images than classes: some class must go without, and the user is told which
    with caplog.at_level("WARNING", logger="imagerec"):
        r = imagerec.train(out=str(tmp_path / "five"), **{**SMALL, "limit_train": 5, "val_fraction": 0.0})
    assert sum(r.metrics["test"]["confusion_matrix"][0]) == 100
    assert "no training images for 5 class(es)" in caplog.text and "--limit-train 5" in caplog.text


def test_early_stopping_without_validation_images_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageRecError, match=r"--early-stopping 1 .* no validation images.*--val-fraction 0\.1") as info:
        imagerec.train(out=str(tmp_path / "es"), early_stopping=1, val_fraction=0.0, **SMALL)
    assert "validation auto" not in str(info.value)  # the metric is not resolved yet: not named as "auto"
    assert not (tmp_path / "es").exists()  # refused before anything was written


@pytest.mark.parametrize(("metric", "multi_label"), [("map", False), ("balanced_accuracy", True)])
def test_a_metric_the_task_does_not_compute_is_refused(metric: str, multi_label: bool) -> None:
    """Early stopping and the best checkpoint watch --metric: one that is never computed would make
    every epoch the best (early stopping never fires), so it is refused up front."""
    from imagerec.config import TrainConfig
    from imagerec.engine.run import resolve_balance

    cfg = TrainConfig(metric=metric)
    with pytest.raises(ImageRecError, match=rf"--metric {metric} is not computed for (multi|single)-label data"):
        resolve_balance(cfg, np.array([10, 10]), multi_label)
    assert resolve_balance(cfg, np.array([10, 10]), not multi_label)[1] == metric  # fine for the other kind


def test_resume_checks_the_limit_train_subset(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """The images `--limit-train` picked are recorded; a resume that would pick others says so."""
    run = tmp_path / "lim"
    small = {**SMALL, "model": "mlp", "limit_train": 128}
    imagerec.train(out=str(run), **small)
    meta_path = run / "last.json"
    assert len(json.loads(meta_path.read_text())["data"]["train_subset"]) == 64
    with caplog.at_level("WARNING", logger="imagerec"):
        imagerec.train(resume=str(run), epochs=2)
    assert "--limit-train" not in caplog.text  # the same subset: nothing to say
    for value, expect in ((None, "saved before imagerec recorded"), ("0" * 64, "differ from those this run started")):
        meta = json.loads(meta_path.read_text())
        if value is None:
            del meta["data"]["train_subset"]  # a run saved by an older imagerec
        else:
            meta["data"]["train_subset"] = value
        meta_path.write_text(json.dumps(meta))
        caplog.clear()
        with caplog.at_level("WARNING", logger="imagerec"):
            imagerec.train(resume=str(run), epochs=meta["state"]["epoch"] + 1)
        assert expect in caplog.text


def _mixers_called(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kind of every batch mixer call during training: 'MixUp', 'CutMix' or 'MultiHotMix'."""
    from torchvision.transforms import v2

    from imagerec.transforms import MultiHotMix

    calls: list[str] = []
    for cls in (v2.MixUp, v2.CutMix, MultiHotMix):
        real = cls.__call__ if cls is MultiHotMix else cls.forward
        name = "__call__" if cls is MultiHotMix else "forward"

        def spy(self, *args, _real=real, _name=cls.__name__):  # type: ignore[no-untyped-def]
            calls.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(cls, name, spy)
    return calls


def test_mixup_zero_turns_strongs_mixing_off_and_the_record_says_what_ran(tmp_path: Path, monkeypatch) -> None:
    import yaml

    calls = _mixers_called(monkeypatch)
    small = {**SMALL, "limit_train": 256, "model": "mlp", "augment": "strong"}
    imagerec.train(out=str(tmp_path / "off"), mixup=0.0, cutmix=0.0, **small)
    assert calls == []  # --mixup 0 --cutmix 0: off, even with strong
    saved = yaml.safe_load((tmp_path / "off" / "config.yaml").read_text())
    assert (saved["mixup"], saved["cutmix"]) == (0.0, 0.0)
    imagerec.train(out=str(tmp_path / "on"), **small)
    assert calls and set(calls) <= {"MixUp", "CutMix"}  # unset: strong's own
    saved = yaml.safe_load((tmp_path / "on" / "config.yaml").read_text())
    assert (saved["mixup"], saved["cutmix"]) == (0.2, 1.0)  # config.yaml records the alphas that ran
    meta = json.loads((tmp_path / "on" / "last.json").read_text())
    assert meta["batch_mixing"] == {"mixup": 0.2, "cutmix": 1.0}


def test_a_checkpoint_from_before_explicit_zero_resumes_mixing_as_it_did(tmp_path: Path, monkeypatch) -> None:
    """An older checkpoint (no `batch_mixing`) of a strong run records mixup 0.0 for "unset": it mixed
    then, and its resume goes on mixing, now with the alphas written down."""
    run = tmp_path / "old"
    imagerec.train(out=str(run), **{**SMALL, "limit_train": 256, "model": "mlp", "augment": "strong"})
    meta = json.loads((run / "last.json").read_text())
    del meta["batch_mixing"]
    meta["train_config"].update(mixup=0.0, cutmix=0.0)  # what older versions wrote for strong's default
    (run / "last.json").write_text(json.dumps(meta))
    calls = _mixers_called(monkeypatch)
    imagerec.train(resume=str(run), epochs=2)
    assert calls and set(calls) <= {"MixUp", "CutMix"}
    meta = json.loads((run / "last.json").read_text())
    assert meta["batch_mixing"] == {"mixup": 0.2, "cutmix": 1.0}
    assert (meta["train_config"]["mixup"], meta["train_config"]["cutmix"]) == (0.2, 1.0)


def test_mixup_on_multi_label_data_mixes_the_label_sets(tmp_path: Path, monkeypatch) -> None:
    import yaml

    spec = read_data("mnist-mini")
    rows = ["path,label"]
    for k, it in enumerate(spec.splits["train"][:200]):
        digit = int(spec.class_names[it.target])
        Image.fromarray(spec.arrays["train"][it.source.index]).save(tmp_path / f"{k}.png")
        rows.append(f"{k}.png,{'even' if digit % 2 == 0 else 'odd'};{'big' if digit >= 5 else 'small'}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    calls = _mixers_called(monkeypatch)
    imagerec.train(data=str(tmp_path / "m.csv"), out=str(tmp_path / "ml"), model="mlp", epochs=1, batch_size=32,
                   mixup=0.4, val_fraction=0.0)
    assert calls and set(calls) == {"MultiHotMix"}  # every training batch, with soft multi-hot targets
    assert yaml.safe_load((tmp_path / "ml" / "config.yaml").read_text())["mixup"] == 0.4
    assert json.loads((tmp_path / "ml" / "last.json").read_text())["batch_mixing"] == {"mixup": 0.4, "cutmix": 0.0}
