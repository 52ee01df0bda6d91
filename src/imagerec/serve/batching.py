"""Dynamic micro-batching: inference threads per model version gather images from concurrent
requests and run `predict_batch` once per batch.

A batch is dispatched when it holds `max_batch` images, or when its oldest image has waited
`max_wait_ms`. Images that waited while the previous batch ran are therefore sent at once: under
load batches fill up by themselves, at low load an image waits at most `max_wait_ms`.
The queue is bounded; `submit` never blocks, it raises `QueueFull` instead.

How long waiting can pay is measured, not guessed (`measure_batch_cost`, `adaptive_wait_ms`): a
batch of n costs about overhead + n x per_image. Waiting w for one more image costs the queued
ones w each and saves at most `overhead` of model time, so the server waits
min(max_wait_ms, overhead). A GPU, or eager PyTorch on small images, has a large overhead per call
and keeps waiting; a CPU runtime whose cost is nearly all per image waits little (OpenVINO int8
ResNet-18 on one core: 5.8-6.5 ms at batch 1, 4.4-4.7 ms per image at batch 4, so ~1.5 ms
instead of 5).

A measured wait is also an informed one (`wait_for_incoming_only`): the server announces each
request from the moment it starts reading its body until its images are queued (`incoming`), and
an image waits for company only while some request is on its way and no other instance is free to
take that one by itself. A lone request (one client, or a quiet moment) goes to the model at once
instead of waiting for images that nobody is sending.

With several model instances (one `predict_batch` each, e.g. two single-threaded runtimes on two
cores), each instance has its own thread and they all take batches from the one queue: while one
instance runs a batch, the next batch starts on another instead of waiting (Triton's instance
groups, TorchServe's workers).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

log = logging.getLogger("imagerec.serve")


class QueueFull(Exception):
    """The batcher's queue cannot take the images now; try again shortly."""


class BatcherClosed(Exception):
    """The batcher was stopped (its model version was unloaded or replaced)."""


@dataclass
class _Job:
    x: torch.Tensor  # uint8 (C, H, W)
    future: Future[torch.Tensor]
    enqueued: float = field(default_factory=time.monotonic)


PredictBatch = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BatchCost:
    """A model's measured cost, modelled as overhead + per_image x n seconds for a batch of n."""

    batch1_s: float
    per_image_s: float

    @property
    def overhead_s(self) -> float:
        return max(0.0, self.batch1_s - self.per_image_s)


def measure_batch_cost(
    predict_batch: PredictBatch, image: torch.Tensor, n: int = 4, budget_s: float = 0.5
) -> BatchCost:
    """Time `predict_batch` on copies of one uint8 (C, H, W) image at batch 1 and batch n.

    One untimed call per size first (the first call at a new batch size can allocate or
    recompile), then timed calls at the two sizes in turn, the fastest of each kept, for up to 10
    rounds or until `budget_s` is spent (at least one round): ~0.25 s of start-up for a ResNet-18
    on one core, one round (about 2 x (1 + n) calls) for a model too slow for the budget.
    """
    one_x = image.unsqueeze(0)
    many_x = one_x.expand(n, *image.shape).contiguous()
    predict_batch(one_x)
    predict_batch(many_x)
    one = many = float("inf")
    deadline = time.perf_counter() + budget_s
    for _ in range(10):
        start = time.perf_counter()
        predict_batch(one_x)
        middle = time.perf_counter()
        predict_batch(many_x)
        end = time.perf_counter()
        one, many = min(one, middle - start), min(many, end - middle)
        if end >= deadline:
            break
    return BatchCost(one, max(0.0, (many - one) / (n - 1)))


def adaptive_wait_ms(cost: BatchCost, max_wait_ms: float) -> float:
    """The longest a lone image should wait for company: never more than the per-batch overhead
    a second image would share (module docstring), and never more than `max_wait_ms`."""
    return min(max_wait_ms, 1000.0 * cost.overhead_s)


class Batcher:
    """Collects uint8 (C, H, W) images and resolves one future per image with its (K,) probabilities.

    `predict_batch` is one function, or one per model instance (each gets its own thread).

    Example:
        >>> batcher = Batcher(predictor.predict_batch, max_batch=32, max_wait_ms=5, capacity=256).start()
        >>> probs = batcher.submit_many([predictor.preprocess(b"...")])[0].result()
    """

    def __init__(
        self,
        predict_batch: PredictBatch | Sequence[PredictBatch],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        capacity: int = 256,
        name: str = "model",
        on_batch: Callable[[int, float], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        wait_for_incoming_only: bool = False,
    ) -> None:
        self.instances = list(predict_batch) if isinstance(predict_batch, Sequence) else [predict_batch]
        if not self.instances:
            raise ValueError("a Batcher needs at least one predict_batch function")
        self.name = name
        self.max_batch, self.max_wait, self.capacity = (
            max_batch,
            max_wait_ms / 1000.0,
            capacity,
        )
        self.on_batch, self.on_depth = on_batch, on_depth
        self.wait_for_incoming_only = wait_for_incoming_only
        self._incoming = 0  # requests announced by `incoming` and not yet queued
        self._idle = 0  # instance threads looking for a batch
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._count_lock = threading.Lock()
        self.batches_run = 0

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Batcher:
        self._threads = [
            threading.Thread(target=self._run, args=(fn,), name=f"batcher-{self.name}-{i}", daemon=True)
            for i, fn in enumerate(self.instances)
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self, drain: bool = True, timeout: float = 30.0, release: bool = False) -> None:
        """Stop taking images; finish the queued ones (drain) or fail them with BatcherClosed.
        `release` drops the predict functions afterwards (and with them the models they hold)."""
        with self._cond:
            self._stopping = True
            if not drain:
                while self._pending:
                    job = self._pending.popleft()
                    if job.future.set_running_or_notify_cancel():
                        job.future.set_exception(
                            BatcherClosed(f"model {self.name} was unloaded")
                        )
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        if release:
            self.instances = []

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads) and not self._stopping

    @property
    def depth(self) -> int:
        return len(self._pending)

    # --- producer side (any thread) ---------------------------------------------------------------
    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce one request on its way (reading its body, decoding) for the `with` block, which
        should end once its images are submitted: with `wait_for_incoming_only`, queued images wait
        for company only while some request is announced."""
        with self._cond:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cond:
                self._incoming -= 1
                self._cond.notify_all()  # a waiting instance may stop waiting now

    def submit_many(self, xs: Sequence[torch.Tensor]) -> list[Future[torch.Tensor]]:
        """Queue all images of one request, or none of them (QueueFull / BatcherClosed)."""
        with self._cond:
            if self._stopping:
                raise BatcherClosed(f"model {self.name} is being unloaded")
            if len(self._pending) + len(xs) > self.capacity:
                raise QueueFull(
                    f"{len(self._pending)} images already queued for {self.name} (capacity {self.capacity})"
                )
            jobs = [_Job(x, Future()) for x in xs]
            self._pending.extend(jobs)
            depth = len(self._pending)
            self._cond.notify()
        if self.on_depth is not None:
            self.on_depth(depth)
        return [j.future for j in jobs]

    # --- the inference thread -----------------------------------------------------------------------
    def _worth_waiting(self) -> bool:
        """Whether an idle instance holding queued images should wait for more (lock held)."""
        if not self.wait_for_incoming_only:
            return True
        # Nobody on the way: waiting cannot fill the batch. Another free instance: the next image
        # can run there at once instead of waiting in this batch.
        return self._incoming > 0 and self._idle == 1

    def _take_batch(self) -> list[_Job] | None:
        with self._cond:
            self._idle += 1
            try:
                while True:
                    while not self._pending:
                        if self._stopping:
                            return None
                        self._cond.wait()
                    deadline = self._pending[0].enqueued + self.max_wait
                    while len(self._pending) < self.max_batch and not self._stopping and self._worth_waiting():
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    if self._pending:  # another instance may have taken them meanwhile
                        break
                # With several instances the queue is shared out: one instance taking everything
                # would leave the others idle while its one long batch runs.
                n = min(self.max_batch, -(-len(self._pending) // len(self.instances)))
                batch = [self._pending.popleft() for _ in range(n)]
                depth = len(self._pending)
                if depth:
                    self._cond.notify()  # an idle instance can start on the rest now
            finally:
                self._idle -= 1
        if self.on_depth is not None:
            self.on_depth(depth)
        return batch

    def _run(self, predict_batch: PredictBatch) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            # Requests that timed out meanwhile cancelled their futures: skip their images.
            jobs = [j for j in batch if j.future.set_running_or_notify_cancel()]
            # All images of one model share a shape; grouping only guards a misbehaving preprocess.
            groups: dict[tuple[int, ...], list[_Job]] = {}
            for j in jobs:
                groups.setdefault(tuple(j.x.shape), []).append(j)
            for group in groups.values():
                self._run_group(predict_batch, group)

    def _run_group(self, predict_batch: PredictBatch, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            probs = predict_batch(torch.stack([j.x for j in jobs]))  # (B, K)
        except Exception as e:  # handed to every waiting request, never swallowed
            log.exception(
                "inference failed for a batch of %d on %s", len(jobs), self.name
            )
            for j in jobs:
                j.future.set_exception(e)
            return
        with self._count_lock:
            self.batches_run += 1
        if self.on_batch is not None:
            self.on_batch(len(jobs), time.perf_counter() - start)
        for i, j in enumerate(jobs):
            j.future.set_result(probs[i])
