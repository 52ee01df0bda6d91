"""The trainer's CUDA paths: AMP (bf16, and fp16 with a gradient scaler), fused optimizers, exact
resume, CPU/GPU agreement of the same checkpoint, and DDP over NCCL under torchrun.

They run where a GPU is (`scripts/gpu_check.sh` on a lent machine) and are skipped elsewhere.
`IMAGEREC_TEST_DEVICE=cpu python -m pytest -m gpu tests/engine/test_cuda.py` runs the same checks
on the CPU: a dry run of the tests' own logic (CPU precision, foreach optimizers, gloo), not of CUDA.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import imagerec
from imagerec.data import read_data

DEVICE = os.environ.get("IMAGEREC_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
RUN = {"data": "mnist-mini", "model": "cnn", "epochs": 2, "limit_train": 2000, "batch_size": 64, "seed": 1,
       "device": DEVICE}


def test_device_report() -> None:
    """Not a check: what the machine is, in the test log (torch, GPU, bf16 support)."""
    info = {"torch": torch.__version__, "device": DEVICE}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported(),
                 "capability": torch.cuda.get_device_capability(0), "gpus": torch.cuda.device_count()}
    print(json.dumps(info))


def test_amp_training_learns_and_predicts_the_same_on_cpu(tmp_path: Path) -> None:
    result = imagerec.train(out=str(tmp_path / "run"), **RUN)
    assert result.metrics["test"]["accuracy"] > 0.9
    if DEVICE.startswith("cuda"):
        assert torch.cuda.max_memory_allocated() > 0  # the run trained on the GPU, in this process
    spec = read_data("mnist-mini")
    images = [Image.fromarray(a) for a in spec.arrays["test"][:300]]
    here = imagerec.load(result.run_dir, device=DEVICE).predict(images)
    cpu = imagerec.load(result.run_dir, device="cpu", precision="fp32").predict(images)
    agree = np.mean([a["label"] == b["label"] for a, b in zip(here, cpu, strict=True)])
    assert agree >= 0.98, f"{DEVICE} and fp32 CPU agree on {agree:.1%} of 300 digits"
    scores = np.array([a["score"] for a in here]) - np.array([b["score"] for b in cpu])
    assert np.abs(scores).max() < 0.1  # bf16/fp16 rounding, not a different model


@pytest.mark.skipif(DEVICE == "cpu", reason="fp16 autocast with a gradient scaler is the CUDA path")
def test_fp16_with_gradient_scaler_trains(tmp_path: Path) -> None:
    result = imagerec.train(out=str(tmp_path / "fp16"), precision="fp16", **RUN)
    assert result.metrics["test"]["accuracy"] > 0.9
    weights = load_file(str(tmp_path / "fp16" / "last.safetensors"))
    assert all(torch.isfinite(v.float()).all() for k, v in weights.items() if k.startswith("model."))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # fused on CUDA, foreach on the CPU
def test_resume_on_the_device_equals_uninterrupted(tmp_path: Path, optimizer: str) -> None:
    """Bit for bit where two uninterrupted runs are (the CPU); where the device itself is not
    (some CUDA backward kernels add in any order even with --deterministic), no further apart than
    two uninterrupted runs are."""
    from test_resume import InterruptAt  # the resume tests' Ctrl-C stand-in (same folder)

    common = {**RUN, "limit_train": 640, "optimizer": optimizer, "deterministic": True}
    for name in ("full", "again"):
        imagerec.train(out=str(tmp_path / name), **common)
    assert imagerec.train(out=str(tmp_path / "cut"), callbacks=[InterruptAt(13)], **common).interrupted
    imagerec.train(resume=str(tmp_path / "cut"))
    full, again, cut = (load_file(str(tmp_path / name / "last.safetensors")) for name in ("full", "again", "cut"))
    assert full.keys() == cut.keys()

    def gap(a: dict, b: dict) -> float:
        return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())

    noise = gap(full, again)
    print(json.dumps({"device": DEVICE, "optimizer": optimizer, "rerun_gap": noise, "resume_gap": gap(full, cut)}))
    if DEVICE == "cpu":
        assert noise == 0.0
    assert gap(full, cut) <= 2 * noise, f"resumed run is {gap(full, cut):.3g} from the uninterrupted one; reruns {noise:.3g}"


def test_ddp_under_torchrun(tmp_path: Path) -> None:
    """One rank per visible GPU (NCCL), at most 2; on the CPU dry run 2 gloo ranks."""
    from test_distributed import launch  # the suite's torchrun launcher with its hang guard (same folder)

    ranks = min(2, torch.cuda.device_count()) if DEVICE.startswith("cuda") else 2
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "imagerec", "train", "mnist-mini", "--model", "cnn", "--epochs", "2", "--limit-train", "2000",
           "--batch-size", "64", "--device", "cuda" if DEVICE.startswith("cuda") else "cpu", "--out", str(out)]
    rc, log = launch(cmd, timeout=300)
    assert rc == 0, log[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.85, metrics["test"]
