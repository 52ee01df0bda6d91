"""The trainer owns the "how": device, precision, channels_last, the loop, checkpoints, resume.

A run is a pure function of (config, seed, data): every random draw in step k of epoch e comes
from a generator seeded with (seed, e, k), so `--resume` continues bit-exactly from any saved
step, including a checkpoint written when the run was interrupted.

With a time limit (`--time-limit`) the epoch count is planned from the measured speed after a
few steps and re-planned after every epoch, the schedule following it; the plan is saved in the
checkpoints, so `--resume` trains to the planned count exactly. Training stops at the limit even
mid-epoch (that epoch is then validated and saved like any other).

Under torchrun the model trains inside DistributedDataParallel; `self.model` stays the plain
module, which is what checkpoints, lookahead and evaluation use. All ranks hold the same weights
(DDP averages the gradients), and rank 0's BatchNorm statistics are copied to the others before
each evaluation, so every rank evaluates, and rank 0 saves, the same model. Epoch sums and
validation outputs are combined over the ranks, so every rank sees the same row and the same
metric, and early stopping decides the same everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagerec.config import TrainConfig, format_minutes
from imagerec.data.loader import DataSourceError, ImageLoader
from imagerec.engine import distributed
from imagerec.engine.callbacks import Callback, StopTraining
from imagerec.engine.checkpoint import best_is_in_last, save_checkpoint
from imagerec.engine.lookahead import Lookahead
from imagerec.engine.optim import create_schedule, set_lr
from imagerec.engine.pipeline import BatchPipeline, autocast, predict_logits
from imagerec.engine.task import ClassificationTask
from imagerec.metrics import classification_metrics, multilabel_metrics
from imagerec.models.pretrained import set_frozen_norms_eval
from imagerec.utils import ImageRecError, mix_seed

log = logging.getLogger("imagerec")


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # batches done in the current epoch
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int = 0
    epochs_since_best: int = 0
    loss_sum: float = 0.0  # running sums of the current epoch (kept across an interruption)
    correct: float = 0.0
    seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    train_seconds: float = 0.0  # time in fit() over every segment of the run, up to the last save
    stopped: str = ""  # why training ended before cfg.epochs (early stopping): a resume has nothing to train
    planned: bool | None = None  # --time-limit: whether the epochs are planned yet (None: saved before this was kept)


def higher_is_better(metric: str) -> bool:
    return metric != "loss"


class StepStop(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, acted on at the end of a step: the state is whole and saved in `last`.
    A plain KeyboardInterrupt out of `fit` (a second signal) saved nothing."""


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        task: ClassificationTask,
        train_loader: ImageLoader,
        val_loader: ImageLoader | None,
        pipeline: BatchPipeline,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        run_dir: Path,
        meta: dict[str, Any],
        callbacks: list[Callback] | None = None,
        deadline: float | None = None,
    ) -> None:
        self.cfg, self.model, self.optimizer, self.task = cfg, model, optimizer, task
        self.train_loader, self.val_loader, self.pipeline = train_loader, val_loader, pipeline
        self.device, self.amp_dtype, self.run_dir, self.meta = device, amp_dtype, run_dir, meta
        self.callbacks = callbacks or []
        self.world_size = distributed.world_size()
        # Under torchrun augmentation and dropout draw from (seed, epoch, step, rank): ranks hold
        # different images, and the same draws on all of them would correlate their augmentations.
        self._seed_rank = (distributed.rank(),) if self.world_size > 1 else ()
        self.train_model = distributed.wrap_model(model, device)
        self.val_items = int(distributed.all_reduce_sum([val_loader.num_items if val_loader is not None else 0])[0])
        self._stop: distributed.StopFlag | None = None
        self.state = TrainState()
        self.schedule = create_schedule(cfg, len(train_loader))
        self.total_steps = cfg.epochs * len(train_loader)
        self.lookahead = Lookahead(model) if cfg.lookahead else None
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        self.stop_reason = ""
        # --time-limit: `deadline` is a time.perf_counter() value; an explicit --epochs caps the plan.
        self.deadline, self.clock = deadline, time.perf_counter
        self.max_epochs = cfg.epochs if "epochs" in cfg.explicit else None
        self._calibration: tuple[int, float] | None = None  # (global step, clock) where timing starts
        self._calibration_steps = max(1, min(20, len(train_loader) // 10))
        self._first_epoch, self._planned, self._time_up = 0, False, False
        self._fit_clock: tuple[float, float] | None = None  # (perf_counter at fit(), train_seconds before it)

    # --- events --------------------------------------------------------------------------------
    def _emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp_dtype)

    # --- the loop ------------------------------------------------------------------------------
    def train_one_epoch(self) -> None:
        s, cfg = self.state, self.cfg
        self.train_model.train()
        if cfg.freeze_backbone:
            set_frozen_norms_eval(self.model)  # the frozen backbone: BatchNorm statistics stay pretrained, no dropout
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        for batch in self.train_loader.epoch(s.epoch, s.epoch_step):
            s.skipped.extend(batch.skipped)
            torch.manual_seed(mix_seed(cfg.seed, s.epoch, s.epoch_step, 1, *self._seed_rank))  # augmentation, dropout
            x, y = self.pipeline(batch, train=True)
            set_lr(self.optimizer, self.schedule(s.global_step))
            with self.autocast():
                out = self.task(self.train_model, x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss = out["loss"]
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.lookahead is not None:
                self.lookahead.step(s.global_step + 1, self.total_steps)
            n = x.shape[0]
            loss_sum += loss.detach() * n
            correct += self.task.correct(out["logits"].detach(), y)
            s.seen += n
            s.epoch_step += 1
            s.global_step += 1
            if self.device.type == "cpu" or s.epoch_step % 50 == 0:
                # Host syncs are free on CPU; on a GPU fold the running sums only now and then.
                s.loss_sum += float(loss_sum)
                s.correct += float(correct)
                loss_sum.zero_()
                correct.zero_()
            self._emit("on_train_batch_end", n)
            if cfg.save_every_steps and s.global_step % cfg.save_every_steps == 0:
                self.save("last")
            if self._stop is not None and self._stop.requested():
                raise StepStop  # every rank at the same step, before fetching the next batch
            if self.deadline is not None and self._watch_time():
                break
        s.loss_sum += float(loss_sum)
        s.correct += float(correct)

    def evaluate(self, loader: ImageLoader) -> dict[str, Any]:
        self._emit("on_eval_start")
        logits, targets, index = predict_logits(self.model, loader, self.pipeline, self.amp_dtype)
        if not np.isfinite(logits).all():
            raise ImageRecError(self._diverged("the model's outputs on the validation images"))
        if loader.world_size > 1:  # a shard per rank: every rank scores all of them, identically
            logits, targets = distributed.gather_predictions(logits, targets, index)
        names = list(self.meta["preprocess"]["class_names"])
        if self.task.multi_label:
            metrics = multilabel_metrics(logits, targets, names)
        else:
            metrics = classification_metrics(logits, targets.astype(np.int64), names)
        self._emit("on_eval_end", metrics)
        return metrics

    def fit(self) -> TrainState:
        """Train from the current state to cfg.epochs; returns the final state."""
        s = self.state
        self._first_epoch = s.epoch
        self._fit_clock = (time.perf_counter(), s.train_seconds)
        self._emit("on_fit_start")
        # Ctrl-C and SIGTERM set a flag that the step loop checks after each step (under torchrun,
        # all ranks together: distributed.StopFlag), so the checkpoint holds whole steps: raised
        # mid-step, the forward pass had already moved the BatchNorm statistics of a step that the
        # resume then ran again. In one process a second signal stops at once, without saving.
        with distributed.stop_on_signal(escalate=self.world_size == 1) as self._stop:
            try:
                while s.epoch < self.cfg.epochs:
                    self._emit("on_epoch_start")
                    t0, wall0 = time.perf_counter(), self.clock()
                    seen0 = s.seen
                    self.train_one_epoch()
                    row = self._end_epoch(time.perf_counter() - t0, s.seen - seen0)
                    self._emit("on_epoch_end", row)
                    if self.deadline is not None:
                        planned = self.cfg.epochs
                        stop = self._replan_after_epoch(self.clock() - wall0)
                        if self.cfg.epochs != planned:
                            self.save("last")  # the checkpoint carries the plan that --resume follows
                        if stop:
                            break
            except StopTraining as e:
                self.stop_reason = s.stopped = str(e)
                self.save("last")  # with the reason: a plain --resume then finds nothing to train
            except StepStop:
                self.save("last")
                raise
            except DataSourceError as e:
                # Raised while fetching a batch, so between steps: `last` is as exact as after a signal.
                self.save("last")
                raise DataSourceError(f"{e}. Training stopped in epoch {s.epoch + 1} after step {s.epoch_step}; "
                                      f"{self.run_dir}/last holds every step before it. Once the store answers "
                                      f"again, continue with: imagerec train --resume {self.run_dir}") from e
            finally:
                self._stop = None
                self._count_seconds()
        self._emit("on_fit_end")
        return s

    # --- --time-limit ---------------------------------------------------------------------------
    def _watch_time(self) -> bool:
        """After each step: plan the epochs once the step time is known; True when time is up."""
        s, now = self.state, self.clock()
        if self._calibration is None:
            self._calibration = (s.global_step, now)  # from the end of the first step: warm-up excluded
        elif s.epoch == self._first_epoch and s.global_step - self._calibration[0] == self._calibration_steps:
            n = len(self.train_loader)
            step_s = (now - self._calibration[1]) / self._calibration_steps
            left = self.deadline - now - (n - s.epoch_step) * step_s  # once this epoch is done
            self._plan(s.epoch + 1 + max(0, math.floor(left / (n * step_s))), n * step_s, "measured over "
                       f"{self._calibration_steps} step{'s' * (self._calibration_steps != 1)}; validation not yet counted")
        self._time_up = distributed.any_rank(distributed.is_main() and now >= self.deadline)  # rank 0's clock
        if self._time_up:
            self.stop_reason = (f"time limit reached in epoch {s.epoch + 1}, step {s.epoch_step}/{len(self.train_loader)}: "
                                "stopped there (validated and saved as usual)")
        return self._time_up

    def _replan_after_epoch(self, epoch_s: float) -> bool:
        """After each epoch, validation and checkpoints included: re-plan from its wall time; True to stop."""
        s, now = self.state, self.clock()
        if self._time_up:
            return True
        self._plan(s.epoch + max(0, math.floor((self.deadline - now) / max(epoch_s, 1e-9))), epoch_s, "last epoch's wall time")
        if s.epoch < self.cfg.epochs:
            return False
        if s.epoch != self.max_epochs:
            self.stop_reason = f"--time-limit {format_minutes(self.cfg.time_limit)}: {s.epoch} epoch(s) fit"
        return True

    def _plan(self, epochs: int, epoch_s: float, basis: str) -> None:
        s = self.state
        epochs = max(s.epoch + (1 if s.epoch_step else 0), epochs)  # never below what is done
        if self.max_epochs is not None:
            epochs = min(epochs, self.max_epochs)
        epochs = int(distributed.broadcast_object(epochs))  # rank 0's plan
        if epochs == self.cfg.epochs and self._planned:
            return
        self._planned = self.state.planned = True
        self.cfg = replace(self.cfg, epochs=epochs)
        self.meta["train_config"]["epochs"] = epochs  # what --resume reads
        steps = len(self.train_loader)
        self.schedule, self.total_steps = create_schedule(self.cfg, steps), epochs * steps
        self._emit("on_plan", f"--time-limit {format_minutes(self.cfg.time_limit)}: {epochs} epoch(s) planned "
                              f"(~{epoch_s:.1f} s each, {basis})")

    def _end_epoch(self, seconds: float, images: int) -> dict[str, Any]:
        s, cfg = self.state, self.cfg
        finite = math.isfinite(s.loss_sum) and all(
            bool(t.isfinite().all()) for t in self.model.state_dict().values() if t.is_floating_point()  # BN statistics too
        )
        # Sums over all ranks (no-op in one process), so every rank writes and decides the same.
        loss_sum, correct, seen, images, diverged = distributed.all_reduce_sum(
            [s.loss_sum, s.correct, s.seen, images, 0.0 if finite else 1.0])
        if diverged:
            raise ImageRecError(self._diverged("the loss"))
        row: dict[str, Any] = {
            "epoch": s.epoch + 1,
            "train_loss": loss_sum / max(1, seen),
            "train_acc": correct / max(1, seen),
            "lr": self.optimizer.param_groups[-1]["lr"],
            "img_per_s": images / max(seconds, 1e-9),
            "epoch_time_s": seconds,
        }
        metric_value = None
        if self.val_loader is not None and self.val_items:
            distributed.broadcast_module(self.model, buffers_only=True)  # rank 0's BatchNorm statistics
            m = self.evaluate(self.val_loader)
            for k in ("loss", "accuracy", "top5", "macro_f1", "balanced_accuracy", "map"):
                if k in m:
                    row[f"val_{k}"] = m[k]
            metric_value = m.get(cfg.metric)
        s.epoch += 1
        s.epoch_step = 0
        s.loss_sum, s.correct, s.seen = 0.0, 0.0, 0
        s.history.append(row)
        improved = metric_value is not None and not math.isnan(metric_value) and (
            s.best_metric is None
            or (metric_value > s.best_metric if higher_is_better(cfg.metric) else metric_value < s.best_metric)
        )
        improved = improved or metric_value is None
        if improved:
            s.best_metric, s.best_epoch, s.epochs_since_best = metric_value, s.epoch, 0
        else:
            s.epochs_since_best += 1
        # `last` first: a kill between the two saves leaves this epoch resumable, its weights the
        # best ones (`best_is_in_last`), which `load_state` saves as `best` again on --resume.
        self.save("last")
        if improved:
            self.save("best")
        return row

    def _diverged(self, what: str) -> str:
        lr = self.cfg.lr if self.cfg.lr is not None else "the default"
        return (f"training diverged: {what} became NaN or infinite in epoch {self.state.epoch + 1}; "
                f"lower --lr (it is {lr}) or set --grad-clip 1.0")

    def _count_seconds(self) -> None:
        if self._fit_clock is not None:
            t0, before = self._fit_clock
            self.state.train_seconds = before + time.perf_counter() - t0

    def save(self, name: str) -> None:
        if not distributed.is_main():
            return  # rank 0 writes the run directory
        self._count_seconds()
        meta = dict(self.meta)
        meta["state"] = asdict(self.state)
        meta["state"]["skipped"] = sorted(set(self.state.skipped))
        last = name == "last"
        extra = self.lookahead.state_dict() if last and self.lookahead is not None else None
        save_checkpoint(self.run_dir / name, self.model, meta, self.optimizer if last else None, extra)
        self._emit("on_checkpoint", name)

    def load_state(self, state: dict[str, Any], extra: dict[str, torch.Tensor]) -> None:
        """Resume from `last`'s state (its weights are loaded into the model already)."""
        self.state = TrainState(**state)
        if self.lookahead is not None:
            self.lookahead.load_state_dict(extra)
        if distributed.is_main() and best_is_in_last(self.run_dir):
            # Killed between the two saves at the end of its best epoch: the model holds those weights.
            log.warning("%s/best was not saved after epoch %d (the run was stopped between its two "
                        "checkpoints); saving it now from %s/last", self.run_dir, self.state.epoch, self.run_dir)
            self.save("best")
