"""Data-parallel training under torchrun: the process group and the few collectives the trainer uses.

`torchrun --nproc_per_node N -m imagerec train ...` starts N processes with RANK, LOCAL_RANK,
LOCAL_WORLD_SIZE and WORLD_SIZE set. `process_group()` turns them into a process group (nccl on
CUDA, one GPU per process; gloo on CPU) and destroys it afterwards. Without those variables, or
with WORLD_SIZE 1, every helper here is a no-op and training is the plain single-process loop.

Small control messages (stop flags, the run directory, gathered eval outputs) go over a gloo group
on the CPU even when gradients use nccl, so they never wait on the GPU stream.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from imagerec.utils import ImageRecError, available_cpus, resolve_device

log = logging.getLogger("imagerec")
T = TypeVar("T")
_control: dist.ProcessGroup | None = None  # the gloo group for control messages (None: the default group)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when it is not set)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ImageRecError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; start the run with torchrun") from e


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def local_world_size() -> int:
    """Processes on this machine (they share its cores and RAM)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size())) if is_enabled() else 1


def is_main() -> bool:
    """True on rank 0, the process that writes the run directory and shows progress."""
    return rank() == 0


def default_threads() -> int:
    """CPU threads per process: the cores divided among this machine's processes, so N processes
    do not oversubscribe them."""
    return max(1, available_cpus() // local_world_size())


def resolve_ddp_device(name: str, local_rank: int) -> torch.device:
    """The device of process LOCAL_RANK: cuda:LOCAL_RANK for auto/cuda when GPUs are visible, else cpu."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ImageRecError(
            f"--device {name} under torchrun needs one CUDA GPU per process (the nccl backend), but this machine "
            "has none visible: use --device cpu (gloo), or run where GPUs are"
        )
    device = resolve_device(name)  # auto -> cuda when GPUs are visible, else cpu; bad names refused there
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ImageRecError(f"device '{name}' is not supported under torchrun: use cpu (gloo) or cuda (nccl)")
    if device.index is not None:
        raise ImageRecError(f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda "
                            "and choose GPUs with CUDA_VISIBLE_DEVICES")
    if local_rank >= torch.cuda.device_count():
        raise ImageRecError(f"LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                            f"use --nproc_per_node {torch.cuda.device_count()} or fewer")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device_name: str = "auto") -> Iterator[torch.device]:
    """Join torchrun's process group for the duration of a run; yields this process's device.

    Example:
        >>> with process_group("auto") as device:   # cuda:LOCAL_RANK or cpu under torchrun
        ...     model.to(device)
    """
    global _control
    world = env_world_size()
    if world <= 1:
        yield resolve_device(device_name)
        return
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ImageRecError(f"WORLD_SIZE is {world} but {', '.join(missing)} not set: start distributed runs with "
                            "torchrun --nproc_per_node N -m imagerec train ...")
    device = resolve_ddp_device(device_name, int(os.environ["LOCAL_RANK"]))
    own = not dist.is_initialized()  # a script under torchrun may have made its own
    if own:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    if dist.get_backend() != "gloo":
        _control = dist.new_group(backend="gloo")
    logger_level = log.level
    if dist.get_rank() != 0:
        log.setLevel(max(logging.WARNING, log.getEffectiveLevel()))  # other ranks: warnings and errors only
    try:
        yield device
    finally:
        log.setLevel(logger_level)
        _control = None
        if own:
            dist.destroy_process_group()


# --- collectives (no-ops in a single process) -------------------------------------------------------
def barrier() -> None:
    if is_enabled():
        dist.barrier(group=_control)


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not is_enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_enabled():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_control)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over all ranks (float64: counts stay exact)."""
    if not is_enabled():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=_control)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    if not is_enabled():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


def run_on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result, or its ImageRecError, to every rank."""
    if not is_enabled():
        return fn()
    result: tuple[bool, Any] = (True, None)
    if is_main():
        try:
            result = (True, fn())
        except ImageRecError as e:
            result = (False, str(e))
    ok, value = broadcast_object(result)
    if not ok:
        raise ImageRecError(value)
    return value


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, buffers_only: bool = False) -> None:
    """Copy rank 0's weights (or only its buffers, e.g. BatchNorm statistics) into every rank's module."""
    if not is_enabled():
        return
    tensors = list(module.buffers()) if buffers_only else list(module.state_dict().values())
    for t in tensors:
        dist.broadcast(t, src=0)


def gather_predictions(logits: np.ndarray, targets: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (logits, targets) of a sharded evaluation, in item order, on every rank."""
    if not is_enabled():
        return logits, targets
    parts = [p for p in all_gather_object((logits, targets, index)) if len(p[2])]
    if not parts:
        return logits, targets
    order = np.argsort(np.concatenate([p[2] for p in parts]), kind="stable")
    return np.concatenate([p[0] for p in parts])[order], np.concatenate([p[1] for p in parts])[order]


# --- the model --------------------------------------------------------------------------------------
def check_sync_bn(sync_bn: bool, device: torch.device) -> bool:
    """Whether to convert BatchNorm to SyncBatchNorm: a logged no-op in a single process (BatchNorm
    already sees the whole batch there), an error on CPU (PyTorch's SyncBatchNorm runs on GPUs only)."""
    if not sync_bn:
        return False
    if not is_enabled():
        log.warning("--sync-bn has no effect in a single process; it applies under torchrun with 2+ processes")
        return False
    if device.type != "cuda":
        raise ImageRecError("--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm does not run on the CPU (gloo); "
                            "drop --sync-bn (each process then normalises with its own batch statistics)")
    return True


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` under torchrun (it starts every rank from rank 0's
    weights and averages gradients); the model itself otherwise."""
    if not is_enabled():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# --- stopping together --------------------------------------------------------------------------------
class StopFlag:
    """Set by SIGTERM/SIGINT. torchrun forwards a signal to every rank, but each receives it at a
    different point of its step; raising at once would leave the others waiting in a collective.
    So the handler only sets a flag and the ranks agree at the end of each step to stop together."""

    def __init__(self) -> None:
        self.raised = False

    def requested(self) -> bool:
        return any_rank(self.raised)


@contextlib.contextmanager
def stop_on_signal(escalate: bool = False) -> Iterator[StopFlag]:
    """SIGTERM/SIGINT set `flag.raised` for the step loop to act on at the end of the step. With
    `escalate` (one process), a second signal raises KeyboardInterrupt at once, for a step that
    hangs (a stuck data source)."""
    flag = StopFlag()

    def handler(signum: int, frame: object) -> None:
        if flag.raised and escalate:
            raise KeyboardInterrupt
        flag.raised = True
        if escalate:
            sys.stderr.write("\nstopping after this step, with a checkpoint (signal again to stop at once, without one)\n")

    sigs = (signal.SIGTERM, signal.SIGINT)
    try:
        previous = [signal.signal(s, handler) for s in sigs]
    except ValueError:  # not the main thread: signals stay as they were
        yield flag
        return
    try:
        yield flag
    finally:
        for s, h in zip(sigs, previous, strict=True):
            signal.signal(s, h)
