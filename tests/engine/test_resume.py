"""Resume == uninterrupted: a run interrupted mid-epoch and resumed ends with the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imagerec.engine.callbacks import Callback
from imagerec.engine.run import train


class InterruptAt(Callback):
    """Simulates Ctrl-C / SIGTERM after a given global step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, batch_size: int) -> None:
        if trainer.state.global_step == self.step:
            raise KeyboardInterrupt


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
    meta = json.loads((tmp_path / "cut" / "last.json").read_text())
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
