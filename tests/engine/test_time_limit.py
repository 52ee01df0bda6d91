"""--time-limit: the epoch count is planned from measured speed, re-planned each epoch, and training
stops at the limit. The planning tests run on a fake clock that advances a fixed amount per step
and per evaluation, so what they check does not depend on this machine's speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import InterruptAt

from imagerec.config import format_minutes, load_config_file, parse_minutes
from imagerec.engine.callbacks import Callback
from imagerec.engine.run import train

COMMON = {"data": "mnist-mini", "model": "mlp", "limit_train": 320, "batch_size": 32, "seed": 1,
          "cache": "ram", "workers": 0, "time_limit": 30.0}  # 10 steps per epoch; the real limit is never reached


class FakeClock(Callback):
    """Replaces the trainer's clock: each step costs `step_s`, each evaluation `eval_s`; `stall` adds
    seconds after a given global step (a machine slowing down). The deadline is `budget` seconds away."""

    def __init__(self, budget: float, step_s: float = 1.0, eval_s: float = 0.0, stall: tuple[int, float] = (0, 0.0)) -> None:
        self.t, self.budget, self.step_s, self.eval_s, self.stall = 0.0, budget, step_s, eval_s, stall
        self.plans: list[str] = []

    def __call__(self) -> float:
        return self.t

    def on_fit_start(self, trainer) -> None:
        trainer.clock, trainer.deadline = self, self.t + self.budget

    def on_train_batch_end(self, trainer, batch_size: int) -> None:
        self.t += self.step_s + (self.stall[1] if trainer.state.global_step == self.stall[0] else 0.0)

    def on_eval_end(self, trainer, metrics) -> None:
        self.t += self.eval_s

    def on_plan(self, trainer, message: str) -> None:
        self.plans.append(message)


def _planned(plans: list[str]) -> list[int]:
    return [int(m.split(": ")[1].split(" epoch")[0]) for m in plans]


def _epochs_in_checkpoint(run: Path) -> int:
    return json.loads((run / "last.json").read_text())["train_config"]["epochs"]


def test_plans_epochs_that_fit_and_stops_before_the_limit(tmp_path: Path) -> None:
    clock = FakeClock(budget=95)  # 10 s per epoch, no validation cost: 9 epochs fit, a 10th would not
    result = train(out=str(tmp_path / "r"), callbacks=[clock], **COMMON)
    assert _planned(clock.plans) == [9]  # planned after 2 steps, unchanged by the epoch-end re-plans
    assert result.metrics["epochs_run"] == 9 and clock.t == 90
    assert _epochs_in_checkpoint(tmp_path / "r") == 9
    assert len((tmp_path / "r" / "history.csv").read_text().strip().splitlines()) == 1 + 9
    assert result.metrics["test"]["accuracy"] > 0.5  # the final evaluation still runs


def test_replans_when_validation_takes_time(tmp_path: Path) -> None:
    clock = FakeClock(budget=95, eval_s=5)  # the first plan cannot see validation; epoch 1's wall time can
    result = train(out=str(tmp_path / "r"), callbacks=[clock], **COMMON)
    assert _planned(clock.plans) == [9, 6]
    assert result.metrics["epochs_run"] == 6


def test_explicit_epochs_cap_the_plan(tmp_path: Path) -> None:
    clock = FakeClock(budget=95)
    result = train(out=str(tmp_path / "r"), callbacks=[clock], **{**COMMON, "epochs": 4})
    assert _planned(clock.plans) == [4] and result.metrics["epochs_run"] == 4


def test_stops_mid_epoch_when_time_is_up(tmp_path: Path) -> None:
    clock = FakeClock(budget=95, stall=(15, 100.0))  # step 15 of 20 (epoch 2) ends past the deadline
    result = train(out=str(tmp_path / "r"), callbacks=[clock], **COMMON)
    assert result.metrics["epochs_run"] == 2 and "test" in result.metrics
    meta = json.loads((tmp_path / "r" / "last.json").read_text())
    assert meta["state"]["global_step"] == 15  # no step after the one that ran out of time
    rows = (tmp_path / "r" / "history.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # the cut epoch was validated and recorded like any other


def test_resume_trains_to_the_planned_epochs_exactly(tmp_path: Path) -> None:
    full_clock = FakeClock(budget=95, eval_s=5)
    train(out=str(tmp_path / "full"), callbacks=[full_clock], **COMMON)
    cut = train(out=str(tmp_path / "cut"), callbacks=[FakeClock(budget=95, eval_s=5), InterruptAt(25)], **COMMON)
    assert cut.interrupted and _epochs_in_checkpoint(tmp_path / "cut") == 6
    resumed = train(resume=str(tmp_path / "cut"))  # no clock, no deadline: the saved plan
    assert resumed.metrics["epochs_run"] == 6
    a, b = load_file(str(tmp_path / "full" / "last.safetensors")), load_file(str(tmp_path / "cut" / "last.safetensors"))
    for k in a:  # weights, BatchNorm statistics, optimizer state: the re-planned schedule is reproduced
        assert torch.equal(a[k], b[k]), k


def test_real_clock_run_plans_and_finishes(tmp_path: Path) -> None:
    """The wiring without a fake clock: a short limit on the real clock (no timing is asserted)."""
    out = tmp_path / "r"
    proc = subprocess.run(
        [sys.executable, "-m", "imagerec.cli", "train", "mnist-mini", "--model", "mlp", "--limit-train", "320",
         "--batch-size", "32", "--epochs", "3", "--time-limit", "300s", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--time-limit 5 min: 3 epoch(s) planned" in proc.stderr  # 5 minutes hold far more; --epochs caps
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 3
    assert "time_limit: 5.0" in (out / "config.yaml").read_text()


@pytest.mark.parametrize(("value", "minutes"), [(20, 20.0), ("20", 20.0), ("20m", 20.0), ("2 min", 2.0),
                                                ("90s", 1.5), ("1.5h", 90.0), (".5H", 30.0)])
def test_time_limit_takes_units(tmp_path: Path, value: object, minutes: float) -> None:
    (tmp_path / "c.yaml").write_text(f"time_limit: {value}\n")
    assert load_config_file(tmp_path / "c.yaml").time_limit == minutes
    assert parse_minutes(value) == minutes


def test_time_limit_is_shown_in_its_unit() -> None:
    assert [format_minutes(parse_minutes(v)) for v in ("10s", "90s", "20", "1.5h")] == ["10 s", "1.5 min", "20 min", "90 min"]


@pytest.mark.parametrize("value", ["-1", "abc", "20x", "1h30", ""])
def test_bad_time_limit_is_a_clear_error(tmp_path: Path, value: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "imagerec.cli", "train", "mnist-mini", "--time-limit", value,
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "time" in proc.stderr.lower() and "Traceback" not in proc.stderr


def test_a_plan_cut_after_the_last_epoch_is_saved_with_it(tmp_path: Path) -> None:
    """The machine slows down in epoch 4 (a 50 s stall): the re-plan after it finds no time for a
    5th epoch and stops. The checkpoint must say 4 epochs, or --resume would train a 5th."""
    clock = FakeClock(budget=95, stall=(35, 50.0))
    result = train(out=str(tmp_path / "r"), callbacks=[clock], **COMMON)
    assert _planned(clock.plans) == [9, 4] and result.metrics["epochs_run"] == 4
    assert _epochs_in_checkpoint(tmp_path / "r") == 4
    resumed = train(resume=str(tmp_path / "r"))
    assert resumed.metrics["epochs_run"] == 4
    assert len((tmp_path / "r" / "history.csv").read_text().strip().splitlines()) == 1 + 4


def test_a_run_stopped_before_its_plan_plans_on_resume_with_the_time_left(tmp_path: Path) -> None:
    """QA: stopped before its first steps were timed, a --time-limit run had saved the unplanned
    default (10 epochs) and its resume trained all 10 with no limit; it now plans, with the time left."""
    import time

    cut = train(out=str(tmp_path / "cut"), callbacks=[FakeClock(budget=95), InterruptAt(1)], **COMMON)
    state = json.loads((tmp_path / "cut" / "last.json").read_text())["state"]
    assert cut.interrupted and state["planned"] is False and _epochs_in_checkpoint(tmp_path / "cut") == 10
    seen: dict[str, float | None] = {}

    class Deadline(Callback):  # before FakeClock, which sets a deadline of its own
        def on_fit_start(self, trainer) -> None:
            seen["left"] = None if trainer.deadline is None else trainer.deadline - time.perf_counter()

    clock = FakeClock(budget=95)
    resumed = train(resume=str(tmp_path / "cut"), callbacks=[Deadline(), clock])
    assert seen["left"] is not None and 0 < seen["left"] <= 30 * 60 - state["train_seconds"]
    assert _planned(clock.plans)[0] == resumed.metrics["epochs_run"] == _epochs_in_checkpoint(tmp_path / "cut") == 9
    planned = train(out=str(tmp_path / "planned"), callbacks=[FakeClock(budget=95), InterruptAt(25)], **COMMON)
    assert planned.interrupted and json.loads((tmp_path / "planned" / "last.json").read_text())["state"]["planned"]
    seen.clear()
    train(resume=str(tmp_path / "planned"), callbacks=[Deadline()])
    assert seen["left"] is None  # planned before the stop: trains to that plan, no deadline


def test_plan_deadline_plans_new_and_unplanned_resumed_runs_only():
    """A new run plans from its start; a resumed run that had planned keeps its plan (None); one
    stopped before it planned plans with the time it has left, never a deadline in the past."""
    from imagerec.engine.resume import plan_deadline

    assert plan_deadline(0.0, 100.0, None) is None
    assert plan_deadline(2.0, 100.0, None) == 220.0
    assert plan_deadline(2.0, 100.0, {"planned": True, "train_seconds": 30.0}) is None
    assert plan_deadline(2.0, 100.0, {"planned": None}) is None  # a run without a limit when it started
    assert plan_deadline(2.0, 100.0, {"planned": False, "train_seconds": 30.0}) == 190.0
    assert plan_deadline(2.0, 100.0, {"planned": False, "train_seconds": 500.0}) == 100.0
