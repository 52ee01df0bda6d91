"""A small callback base (fastai's `_with_events`, about ten events) and the stock callbacks."""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from imagerec.utils import atomic_write

if TYPE_CHECKING:
    from imagerec.engine.trainer import Trainer


class StopTraining(Exception):
    """Raised by a callback (e.g. early stopping) to end training cleanly after this epoch."""


class Callback:
    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_fit_end(self, trainer: Trainer) -> None: ...
    def on_epoch_start(self, trainer: Trainer) -> None: ...
    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None: ...
    def on_train_batch_end(self, trainer: Trainer, batch_size: int) -> None: ...
    def on_eval_start(self, trainer: Trainer) -> None: ...
    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, trainer: Trainer, name: str) -> None: ...
    def on_plan(self, trainer: Trainer, message: str) -> None: ...  # --time-limit set or changed the epoch count


class EarlyStopping(Callback):
    """Stop when `metric` has not improved for `patience` epochs."""

    def __init__(self, metric: str, patience: int) -> None:
        self.metric, self.patience = metric, patience

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if trainer.state.epochs_since_best >= self.patience:
            raise StopTraining(f"early stopping: val {self.metric} did not improve for {self.patience} epoch(s)")


class HistoryCSV(Callback):
    """One row per epoch in DIR/history.csv; rewritten whole so a resumed run stays consistent."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        rows = trainer.state.history
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_write(self.path, newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


class ProgressBar(Callback):
    """rich progress bar per epoch: loss, accuracy, img/s and ETA; one summary line per epoch."""

    def __init__(self, console: Console | None = None, refresh_every: int = 10) -> None:
        self.console = console or Console(stderr=True)
        self.refresh_every = refresh_every
        self.progress: Progress | None = None

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.t0, self.seen, self.steps = time.perf_counter(), 0, 0
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        self.progress.start()
        total = len(trainer.train_loader)
        self.task = self.progress.add_task("train", total=total, completed=trainer.state.epoch_step,
                                           epoch=f"{trainer.state.epoch + 1}/{trainer.cfg.epochs}", stats="")

    def on_train_batch_end(self, trainer: Trainer, batch_size: int) -> None:
        self.seen += batch_size
        self.steps += 1
        assert self.progress is not None
        stats = None
        if self.steps % self.refresh_every == 0:
            s = trainer.state
            # rank 0's images times the processes: under torchrun every rank takes a batch per step
            rate = self.seen * trainer.world_size / max(1e-9, time.perf_counter() - self.t0)
            loss = s.loss_sum / max(1, s.seen)
            acc = s.correct / max(1, s.seen)
            stats = f"loss {loss:.4f}  acc {acc:.2%}  {rate:,.0f} img/s"
        self.progress.update(self.task, advance=1, **({"stats": stats} if stats else {}))

    def on_plan(self, trainer: Trainer, message: str) -> None:
        self.console.print(message, highlight=False)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
        parts = [f"epoch {row['epoch']}/{trainer.cfg.epochs}", f"train loss {row['train_loss']:.4f}", f"acc {row['train_acc']:.2%}"]
        for key in ("val_loss", "val_accuracy", "val_macro_f1", "val_map"):
            if key in row and isinstance(row[key], float) and not math.isnan(row[key]):
                parts.append(f"{key.replace('_', ' ')} {row[key]:.4f}" if "loss" in key else f"{key.replace('_', ' ')} {row[key]:.2%}")
        parts.append(f"{row['img_per_s']:,.0f} img/s")
        parts.append(f"{row['epoch_time_s']:.1f}s")
        self.console.print("  ".join(parts), highlight=False)
        sys.stderr.flush()
