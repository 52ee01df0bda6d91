"""Resume == uninterrupted: a run interrupted mid-epoch and resumed ends with the same weights."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imagerec.engine.callbacks import Callback
from imagerec.engine.run import train
from imagerec.utils import ImageRecError


class InterruptAt(Callback):
    """Ctrl-C (a real SIGINT to this process) `signals` times in the middle of a given global step:
    from the model's forward pass, where the BatchNorm statistics have already moved."""

    def __init__(self, step: int, signals: int = 1) -> None:
        self.step, self.signals, self.hook = step, signals, None

    def on_fit_start(self, trainer) -> None:
        def forward(module, args, output) -> None:
            if module.training and trainer.state.global_step == self.step - 1:
                for _ in range(self.signals):
                    os.kill(os.getpid(), signal.SIGINT)

        self.hook = trainer.model.register_forward_hook(forward)

    def on_fit_end(self, trainer) -> None:
        self.hook.remove()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last.safetensors"))


CASES = [
    pytest.param({"cache": "ram", "augment": "standard", "workers": 0}, id="ram-cache"),
    pytest.param({"cache": "none", "augment": "strong", "workers": 1, "model": "mlp"}, id="streaming-workers-mixup"),
    # lookahead's slow weights are training state too: step 13 falls between two lookahead syncs
    pytest.param({"recipe": "fast", "model": "airbench", "cache": "ram", "workers": 0}, id="fast-recipe-lookahead"),
]


@pytest.mark.parametrize("opts", CASES)
def test_resume_mid_epoch_equals_uninterrupted(tmp_path: Path, opts: dict) -> None:
    common = {"data": "mnist-mini", "epochs": 2, "batch_size": 64, "limit_train": 640, "model": "cnn", "seed": 3, **opts}
    full = train(out=str(tmp_path / "full"), **common)
    assert not full.interrupted

    cut = train(out=str(tmp_path / "cut"), callbacks=[InterruptAt(13)], **common)  # 10 steps/epoch: stop in epoch 2
    assert cut.interrupted
    meta = json.loads((tmp_path / "cut" / "last.json").read_text())  # step 13 finished, then saved
    assert (meta["state"]["epoch"], meta["state"]["epoch_step"], meta["state"]["global_step"]) == (1, 3, 13)
    before = _weights(tmp_path / "cut")
    assert any(not torch.equal(before[k], v) for k, v in _weights(tmp_path / "full").items() if k.startswith("model."))

    resumed = train(resume=str(tmp_path / "cut"))
    assert not resumed.interrupted
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:  # model weights, BN statistics and optimizer moments, bit for bit
        assert torch.equal(a[k], b[k]), k
    hist_full = (tmp_path / "full" / "history.csv").read_text().splitlines()
    hist_cut = (tmp_path / "cut" / "history.csv").read_text().splitlines()
    assert len(hist_full) == len(hist_cut) == 3
    # train loss/accuracy columns are identical too (timing columns differ)
    for ra, rb in zip(hist_full[1:], hist_cut[1:], strict=True):
        assert ra.split(",")[:4] == rb.split(",")[:4]


def test_resume_can_extend_epochs(tmp_path: Path) -> None:
    run = tmp_path / "r"
    train(data="mnist-mini", out=str(run), epochs=1, limit_train=512, batch_size=64)
    result = train(resume=str(run), epochs=2)
    assert result.metrics["epochs_run"] == 2
    assert len((run / "history.csv").read_text().strip().splitlines()) == 3


def test_resume_finished_run_changes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "r"
    train(data="mnist-mini", out=str(run), epochs=1, limit_train=256, batch_size=64)
    before = _weights(run)
    train(resume=str(run))
    after = _weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_second_signal_stops_at_once_and_resumes_from_the_checkpoint_before(tmp_path: Path) -> None:
    """Ctrl-C twice: out at once, mid-step, saving nothing; `last` is still the end of epoch 1 and
    the resume from it ends where an uninterrupted run does."""
    common = {"data": "mnist-mini", "epochs": 2, "batch_size": 64, "limit_train": 640, "model": "cnn", "seed": 3,
              "cache": "ram", "workers": 0}
    full = train(out=str(tmp_path / "full"), **common)
    cut = train(out=str(tmp_path / "cut"), callbacks=[InterruptAt(13, signals=2)], **common)
    assert cut.interrupted
    meta = json.loads((tmp_path / "cut" / "last.json").read_text())
    assert (meta["state"]["epoch"], meta["state"]["epoch_step"], meta["state"]["global_step"]) == (1, 0, 10)
    train(resume=str(tmp_path / "cut"))
    a, b = _weights(full.run_dir), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_settings_the_saved_state_depends_on(tmp_path: Path) -> None:
    run = tmp_path / "r"
    train(data="mnist-mini", out=str(run), epochs=1, limit_train=256, batch_size=64, model="cnn")
    for change, named in (({"model": "mlp"}, "--model 'mlp' (it was 'cnn')"),
                          ({"optimizer": "sgd"}, "--optimizer 'sgd' (it was 'adamw')"),
                          ({"batch_size": 32}, "--batch-size 32 (it was 64)"),
                          ({"limit_train": 100}, "--limit-train 100 (it was 256)"),
                          ({"data": "cifar10"}, "DATA cifar10 (it was mnist-mini)"),
                          ({"out": str(tmp_path / "elsewhere")}, "--out")):
        with pytest.raises(ImageRecError, match=r"--resume .* cannot change " + re.escape(named)):
            train(resume=str(run), epochs=2, **change)
    assert len((run / "history.csv").read_text().strip().splitlines()) == 2  # nothing was trained
    # what can change: how long it trains, where and how fast it runs; the same value is no change
    result = train(resume=str(run), epochs=2, workers=0, num_threads=1, model="cnn", data="mnist-mini", out=str(run))
    assert result.metrics["epochs_run"] == 2


def test_resume_keeps_the_record_true(tmp_path: Path) -> None:
    """A resume with nothing to train rewrites nothing (config.yaml once said epochs 1 for a 2-epoch
    model, and train_seconds became 0); a resume that trains adds its time to the run's."""
    run = tmp_path / "r"
    train(data="mnist-mini", out=str(run), epochs=2, limit_train=256, batch_size=64, val_fraction=0.02)
    config = (run / "config.yaml").read_text()
    assert "model: cnn\n" in config and "lr: 0.003\n" in config and "weight_decay: 0.05\n" in config  # resolved
    record = {f: (run / f).read_bytes() for f in ("config.yaml", "metrics.json", "history.csv", "last.json", "best.json")}
    for overrides in ({"epochs": 1}, {}):
        result = train(resume=str(run), **overrides)
        assert result.metrics["epochs_run"] == 2
        assert {f: (run / f).read_bytes() for f in record} == record
    before = json.loads(record["metrics.json"])["train_seconds"]
    assert before == pytest.approx(json.loads(record["last.json"])["state"]["train_seconds"], abs=0.5)
    result = train(resume=str(run), epochs=3)
    third_epoch = float((run / "history.csv").read_text().strip().splitlines()[-1].split(",")[5])  # epoch_time_s
    assert result.metrics["train_seconds"] >= before + third_epoch - 0.01
    assert "epochs: 3\n" in (run / "config.yaml").read_text()


def test_resume_evaluates_again_a_run_stopped_during_its_final_evaluation(tmp_path: Path) -> None:
    """QA: a resumed run killed after its last checkpoint, while it evaluated the final model, kept
    the metrics.json (and eval files) of the segment before, and `--resume` then reported those."""
    run = tmp_path / "r"
    train(data="mnist-mini", out=str(run), epochs=1, limit_train=256, batch_size=64, model="mlp")
    record = ("metrics.json", "eval-test.json", "confusion-test.png")
    first = {f: (run / f).read_bytes() for f in record}
    train(resume=str(run), epochs=2)
    second = {f: (run / f).read_bytes() for f in record}
    assert json.loads(second["metrics.json"])["checkpoints"] == {
        name: json.loads((run / f"{name}.json").read_text())["weights_id"] for name in ("best", "last")}

    def stopped_in_final_evaluation(metrics_json: bytes) -> None:  # the epoch-2 checkpoints, the epoch-1 record
        for f in record:
            (run / f).write_bytes(first[f])
        (run / "metrics.json").write_bytes(metrics_json)

    old_style = json.loads(first["metrics.json"])
    del old_style["checkpoints"]  # as written before metrics.json named its checkpoints: compared by epochs_run
    for stale in (first["metrics.json"], json.dumps(old_style).encode()):
        stopped_in_final_evaluation(stale)
        result = train(resume=str(run))
        assert result.metrics["epochs_run"] == 2
        now = json.loads((run / "metrics.json").read_text())
        assert now["epochs_run"] == 2 and now["test"] == json.loads(second["metrics.json"])["test"]
        assert (run / "eval-test.json").read_bytes() == second["eval-test.json"]
        assert (run / "confusion-test.png").read_bytes() == second["confusion-test.png"]
    # a current record from before `checkpoints` (same epochs) is kept as it is
    current = json.loads(second["metrics.json"])
    del current["checkpoints"]
    (run / "metrics.json").write_text(json.dumps(current))
    before = (run / "metrics.json").read_bytes()
    assert train(resume=str(run)).metrics["epochs_run"] == 2
    assert (run / "metrics.json").read_bytes() == before


def test_resume_of_an_early_stopped_run_has_nothing_to_train(tmp_path: Path) -> None:
    """QA: early stopping was not saved, so `--resume` of an early-stopped run trained one more epoch
    (stopping early again) and rewrote last, history.csv and metrics.json, each time it was run."""
    import hashlib

    run = tmp_path / "r"
    # lr 1e-30: the weights barely move, val loss stops improving, early stopping ends epoch 2 of 6
    first = train(data="mnist-mini", out=str(run), model="mlp", epochs=6, limit_train=500, batch_size=50, lr=1e-30,
                  metric="loss", early_stopping=1)
    assert first.metrics["epochs_run"] == 2
    files = ("last.safetensors", "last.json", "history.csv", "metrics.json")
    before = {f: hashlib.sha256((run / f).read_bytes()).hexdigest() for f in files}
    again = train(resume=str(run))
    assert again.metrics["epochs_run"] == 2
    assert {f: hashlib.sha256((run / f).read_bytes()).hexdigest() for f in files} == before
    more = train(resume=str(run), epochs=8)  # --epochs raised: trains on (and stops early again, patience 1)
    assert more.metrics["epochs_run"] == 3
