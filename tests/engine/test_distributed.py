"""Distributed data-parallel training: real torchrun processes on the CPU (gloo, 2 ranks).

Every launch runs `python -m torch.distributed.run --standalone` in its own session with a
timeout; a launch that hangs (a rank waiting on a collective the others never join) is killed
with its whole process group and the test fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import imagerec
from imagerec.config import load_config_file
from imagerec.data import read_data
from imagerec.data.loader import ImageLoader
from imagerec.engine import distributed
from imagerec.utils import ImageRecError

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TIMEOUT = 120  # a launch takes ~10-20 s on 2 busy cores; a hung rank takes forever


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts each rank in a session of its own, out of its group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_all(proc: subprocess.Popen) -> str:
    """SIGKILL `proc` and every process under it; what it printed."""
    for pid in descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[0]


def wait_for_step(run: Path, proc: subprocess.Popen, step: int) -> None:
    """Until `run`/last.json is at global step `step` or later (or `proc` ended, or TIMEOUT passed)."""
    deadline, at = time.monotonic() + TIMEOUT, 0
    while at < step and time.monotonic() < deadline and proc.poll() is None:
        try:
            at = json.loads((run / "last.json").read_text())["state"]["global_step"]
        except (OSError, ValueError, KeyError):
            pass  # not written yet, or being replaced
        time.sleep(0.02)


def launch(args: list[str], timeout: float = TIMEOUT) -> tuple[int, str]:
    """Run a command to the end; kill it with every process under it and fail if it outlives `timeout`."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = kill_all(proc)
        pytest.fail(f"{' '.join(args[-12:])} did not finish in {timeout} s (a rank hung?):\n{out[-4000:]}")
    return proc.returncode, out


def torchrun_train(*args: str | Path) -> str:
    rc, out = launch([*TORCHRUN, "-m", "imagerec", "train", *map(str, args)])
    assert rc == 0, out[-4000:]
    return out


def model_tensors(run: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(run / f"{name}.safetensors")).items() if k.startswith("model.")}


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# --- sharding, without processes ----------------------------------------------------------------------


def _loader(n: int, batch_size: int, shuffle: bool, rank: int = 0, world: int = 1) -> ImageLoader:
    spec = read_data("mnist-mini")
    items = spec.splits["train"][:n]
    targets = torch.tensor([it.target for it in items])
    return ImageLoader(items, spec.arrays, 1, 28, lambda im: im, batch_size, targets, shuffle=shuffle, seed=5,
                       workers=0, cache="ram", fast_arrays=True, rank=rank, world_size=world)


def test_ranks_split_each_global_batch_of_one_process() -> None:
    one = _loader(300, 64, shuffle=True)
    ranks = [_loader(300, 32, shuffle=True, rank=r, world=2) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 300 // 64  # same steps on every rank
    for epoch in (0, 1):
        for k, (whole, *parts) in enumerate(zip(one.epoch(epoch), *(r.epoch(epoch) for r in ranks), strict=True)):
            assert [len(p.index) for p in parts] == [32, 32]
            assert torch.equal(parts[0].index, whole.index[0::2]) and torch.equal(parts[1].index, whole.index[1::2]), k
            assert torch.equal(parts[1].x, whole.x[1::2])
    # a resumed epoch starts at the same global batch on every rank
    assert torch.equal(next(ranks[1].epoch(1, start_step=2)).index, list(one.epoch(1))[2].index[1::2])


def test_eval_shards_partition_the_items() -> None:
    shards = [_loader(301, 64, shuffle=False, rank=r, world=2) for r in range(2)]
    assert [s.num_items for s in shards] == [151, 150]  # each rank decodes only its share
    seen = torch.cat([b.index for s in shards for b in s.epoch(0)])
    assert sorted(seen.tolist()) == list(range(301))


def test_device_and_sync_bn_errors(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ImageRecError, match="needs one CUDA GPU per process.*--device cpu"):
            distributed.resolve_ddp_device("cuda", 0)
    assert distributed.resolve_ddp_device("cpu", 1) == torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="imagerec"):
        assert distributed.check_sync_bn(True, torch.device("cpu")) is False  # one process: a logged no-op
    assert "--sync-bn has no effect in a single process" in caplog.text
    monkeypatch.setattr(distributed, "is_enabled", lambda: True)
    with pytest.raises(ImageRecError, match="SyncBatchNorm does not run on the CPU"):
        distributed.check_sync_bn(True, torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ImageRecError, match="RANK.*not set.*torchrun"), distributed.process_group("cpu"):
        pass


# --- real torchrun runs -------------------------------------------------------------------------------


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    # rnn: no BatchNorm (per-rank statistics) and no dropout (per-rank draws), so the global batch
    # alone decides each step. SGD rather than Adam: Adam divides by sqrt(v), which magnifies
    # rounding differences of near-zero gradient components.
    opts = {"data": "mnist-mini", "epochs": 1, "limit_train": 512, "model": "rnn", "precision": "fp32",
            "augment": "none", "optimizer": "sgd", "lr": 0.2, "seed": 1}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items() if k != "data"]
    out = torchrun_train("mnist-mini", *flags, "--batch-size", "32", "--out", tmp_path / "ddp")
    assert "2 processes x batch 32 = global batch 64" in out
    imagerec.train(out=str(tmp_path / "one"), batch_size=64, **opts)
    imagerec.train(out=str(tmp_path / "half"), batch_size=32, **opts)  # other batches: must differ
    ddp, one, half = (model_tensors(tmp_path / n) for n in ("ddp", "one", "half"))
    # Same global batches: only the order of float32 sums differs (a rank's 32-sample gradient, then
    # the mean of two, against one 64-sample sum), ~1e-7 relative per step; measured after the 8
    # steps: 1.5e-8 (2 ulp of the largest weights, ~0.1). 1e-6 leaves ~70x headroom, while batches
    # of 32 instead of 64 move the weights by 0.1.
    tol = 1e-6
    assert max_diff(ddp, one) < tol
    assert max_diff(half, one) > 1000 * tol
    (h_ddp,), (h_one,) = _history(tmp_path / "ddp"), _history(tmp_path / "one")
    assert h_ddp["train_acc"] == h_one["train_acc"]  # epoch sums combined over the ranks
    assert float(h_ddp["train_loss"]) == pytest.approx(float(h_one["train_loss"]), rel=1e-6)


def test_ddp_run_directory_is_written_once_and_usable(tmp_path: Path) -> None:
    # cnn: BatchNorm (rank 0's statistics are what every rank evaluates and what is saved), channels_last
    out = torchrun_train("mnist-mini", "--epochs", "2", "--limit-train", "1024", "--batch-size", "32", "--lookahead",
                         "--out", tmp_path / "run")
    assert out.count("training cnn") == 1 and out.count("run saved in") == 1  # rank 0 alone prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    run = tmp_path / "run"
    assert {"config.yaml", "best.json", "best.safetensors", "last.json", "last.safetensors", "history.csv", "metrics.json",
            "eval-val.json", "eval-test.json", "confusion-val.png", "confusion-test.png"} <= {p.name for p in run.iterdir()}
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["global_batch_size"], metrics["epochs_run"]) == (2, 64, 2)
    assert json.loads((run / "best.json").read_text())["distributed"] == {"world_size": 2, "global_batch_size": 64}
    assert len(_history(run)) == 2
    assert "global batch 64" in (run / "config.yaml").read_text().splitlines()[0]
    assert load_config_file(run / "config.yaml").batch_size == 32  # still a valid --config file
    assert not any(k.startswith("model.module.") for k in load_file(str(run / "best.safetensors")))

    # The test split was scored in two shards and gathered; a single process must agree exactly.
    single = imagerec.evaluate(str(run), split="test", write=False)
    assert single["num_samples"] == metrics["test"]["num_samples"] == 1000
    assert single["accuracy"] == metrics["test"]["accuracy"] > 0.5
    assert single["confusion_matrix"] == metrics["test"]["confusion_matrix"]

    spec = read_data("mnist-mini")
    paths, truth = [], []
    for k, it in enumerate(spec.splits["test"][:40:2]):
        paths.append(tmp_path / f"d{k}.png")
        Image.fromarray(spec.arrays["test"][it.source.index]).save(paths[-1])
        truth.append(spec.class_names[it.target])
    preds = imagerec.load(str(run)).predict(paths)
    assert sum(p["label"] == t for p, t in zip(preds, truth, strict=True)) >= 12


ES_SCRIPT = """
import json, os, sys
import imagerec
from imagerec.engine.callbacks import Callback

class Record(Callback):
    def on_fit_end(self, trainer):
        rows = [{k: v for k, v in r.items() if k not in ("img_per_s", "epoch_time_s")} for r in trainer.state.history]
        self.out = {"rows": rows, "best_epoch": trainer.state.best_epoch, "stop": trainer.stop_reason}

rec = Record()
r = imagerec.train(data="mnist-mini", out=sys.argv[1], epochs=8, limit_train=1024, batch_size=32, early_stopping=1,
                   lr=5.0, optimizer="sgd", callbacks=[rec])
rec.out.update(main=r.main_process, test=r.metrics["test"]["accuracy"])
with open(sys.argv[1] + f"-rank{os.environ['RANK']}.json", "w") as f:
    json.dump(rec.out, f)
"""


def run_script_on_ranks(tmp_path: Path, source: str) -> tuple[dict, dict]:
    """Run `source` under torchrun with the run directory tmp_path/run; the JSON each rank wrote next to it."""
    script = tmp_path / "script.py"
    script.write_text(source)
    rc, out = launch([*TORCHRUN, str(script), str(tmp_path / "run")])
    assert rc == 0, out[-4000:]
    r0, r1 = (json.loads((tmp_path / f"run-rank{r}.json").read_text()) for r in range(2))
    return r0, r1


def test_early_stopping_and_validation_agree_on_every_rank(tmp_path: Path) -> None:
    # The Python API under torchrun; lr so high that val accuracy stops improving (as in the
    # single-process early-stopping test). Ranks that disagreed would hang or crash the launch.
    r0, r1 = run_script_on_ranks(tmp_path, ES_SCRIPT)
    assert (r0["main"], r1["main"]) == (True, False)
    assert r0["stop"].startswith("early stopping") and len(r0["rows"]) < 8
    assert r0["rows"] == r1["rows"]  # train sums and val metrics, bit for bit
    assert (r0["best_epoch"], r0["test"]) == (r1["best_epoch"], r1["test"])
    assert len(_history(tmp_path / "run")) == len(r0["rows"])


TIME_LIMIT_SCRIPT = """
import json, os, sys
import imagerec
from imagerec.engine.callbacks import Callback

class Clock(Callback):  # a fake clock per rank: rank 1's runs 3x faster, so its own plan would differ
    def __init__(self, step_s):
        self.t, self.step_s, self.plans = 0.0, step_s, []
    def __call__(self):
        return self.t
    def on_fit_start(self, trainer):
        trainer.clock, trainer.deadline = self, 95.0
    def on_train_batch_end(self, trainer, n):
        self.t += self.step_s
    def on_plan(self, trainer, message):
        self.plans.append(message.split(" planned")[0])
    def on_fit_end(self, trainer):
        self.rows = [{k: v for k, v in r.items() if k not in ("img_per_s", "epoch_time_s")} for r in trainer.state.history]

clock = Clock(1.0 if os.environ["RANK"] == "0" else 3.0)
r = imagerec.train(data="mnist-mini", out=sys.argv[1], model="mlp", limit_train=640, batch_size=32, time_limit=30,
                   cache="ram", workers=0, callbacks=[clock])
with open(sys.argv[1] + f"-rank{os.environ['RANK']}.json", "w") as f:
    json.dump({"plans": clock.plans, "rows": clock.rows, "epochs": r.metrics["epochs_run"]}, f)
"""


def test_time_limit_follows_rank_0_on_every_rank(tmp_path: Path) -> None:
    # 640 images, 2 x 32 per step: 10 steps an epoch. Rank 0 (1 s a step) fits 9 epochs in 95 s;
    # rank 1's clock alone would plan 3 and stop at step 32. Both must follow rank 0 step for step.
    r0, r1 = run_script_on_ranks(tmp_path, TIME_LIMIT_SCRIPT)
    assert r0["plans"] == r1["plans"] == ["--time-limit 30 min: 9 epoch(s)"]
    assert r0["epochs"] == r1["epochs"] == 9
    assert r0["rows"] == r1["rows"]


RESUME = ["mnist-mini", "--limit-train", "1024", "--batch-size", "32", "--schedule", "constant", "--save-every-steps", "1",
          "--seed", "2"]  # constant schedule: the lr of a step does not depend on --epochs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "full"
    torchrun_train(*RESUME, "--epochs", "2", "--out", run)
    return run


def test_ddp_resume_continues_exactly(uninterrupted: Path, tmp_path: Path) -> None:
    run = tmp_path / "cut"
    torchrun_train(*RESUME, "--epochs", "1", "--out", run)
    torchrun_train("--resume", run, "--epochs", "2")
    a, b = load_file(str(uninterrupted / "last.safetensors")), load_file(str(run / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # weights, BN statistics, optimizer

    # and a single process continues a DDP run: a step is now 32 images, not 64, so the schedule
    # counts the 2 finished epochs as 2 x 32 steps of the new size
    r = imagerec.train(resume=str(run), epochs=3)
    meta = json.loads((run / "last.json").read_text())
    assert (r.metrics["world_size"], r.metrics["epochs_run"]) == (1, 3)
    assert meta["state"]["global_step"] == 3 * 32
    assert len(_history(run)) == 3


def test_sigterm_saves_on_rank_0_and_resume_is_exact(uninterrupted: Path, tmp_path: Path) -> None:
    run = tmp_path / "killed"
    cmd = [*TORCHRUN, "-m", "imagerec", "train", *RESUME, "--epochs", "2", "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_step(run, proc, 3)
        proc.send_signal(signal.SIGTERM)  # as a scheduler would: torchrun forwards it to every rank
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        out = kill_all(proc)
        pytest.fail(f"a rank hung after SIGTERM:\n{out[-4000:]}")
    assert time.monotonic() - t0 < 30, out[-4000:]  # well before torchrun's SIGKILL after 30 s
    assert "interrupted: saved" in out, out[-4000:]
    state = json.loads((run / "last.json").read_text())["state"]
    assert 3 <= state["global_step"] < 32, state  # stopped mid-run (2 epochs x 16 steps)

    torchrun_train("--resume", run)
    a, b = load_file(str(uninterrupted / "last.safetensors")), load_file(str(run / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same val metrics per epoch (the train loss of the cut epoch is estimated from rank 0's share)
    cols = ("epoch", "val_loss", "val_accuracy")
    assert [[r[c] for c in cols] for r in _history(uninterrupted)] == [[r[c] for c in cols] for r in _history(run)]


def test_a_killed_rank_leaves_one_error_line_naming_the_checkpoint_to_resume(tmp_path: Path) -> None:
    """kill -9 of one rank: the other's collective fails. It used to end in gloo's 30-line traceback
    ("Connection reset by peer ... GLHF!"), with nothing saying that last.json survived or how to go on."""
    run = tmp_path / "lost"
    cmd = [*TORCHRUN, "-m", "imagerec", "train", *RESUME, "--epochs", "3", "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = False
    try:
        wait_for_step(run, proc, 3)
        for pid in descendants(proc.pid):
            with contextlib.suppress(OSError):
                if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    os.kill(pid, signal.SIGKILL)
                    killed = True
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        out = kill_all(proc)
        pytest.fail(f"rank 0 hung after rank 1 was killed:\n{out[-4000:]}")
    assert killed and proc.returncode != 0, out[-4000:]
    assert "error: another process of this 2-process run stopped" in out, out[-4000:]
    assert f"continue with: torchrun --nproc_per_node 2 -m imagerec train --resume {run}" in out, out[-4000:]
    assert "Connection reset by peer" in out or "Connection closed by peer" in out, out[-4000:]
    assert "GLHF" not in out, out[-4000:]  # the end of gloo's message, printed only by the traceback
