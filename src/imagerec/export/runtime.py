"""Runtimes: one interface, `run(uint8 batch (B, C, H, W)) -> probabilities (B, K)`, over
ONNX Runtime, OpenVINO, TorchScript and eager PyTorch, so the Predictor does not care which one it holds."""

from __future__ import annotations

import contextlib
import ctypes
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from imagerec.config import PreprocessConfig
from imagerec.engine.pipeline import autocast
from imagerec.transforms import normalize_batch
from imagerec.utils import ImageRecError, available_cpus, c_library


class Runtime(Protocol):
    """Anything that maps a uint8 (or 0..255 float) batch (B, C, H, W) to float32 probabilities (B, K)."""

    name: str

    def run(self, x: torch.Tensor | np.ndarray) -> torch.Tensor: ...


def as_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 stays as is; a float batch in 0..255 is rounded and clipped."""
    arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


class OrtRuntime:
    """An ONNX Runtime CPU session: one intra-op thread per core, every graph optimisation on."""

    def __init__(self, path: str | Path, name: str = "onnx-fp32", threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or available_cpus()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ImageRecError(f"{path}: ONNX Runtime cannot load this model ({e})") from e
        self.name, self.path = name, Path(path)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def run(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        out = self.session.run([self.output_name], {self.input_name: as_uint8(x)})[0]
        return torch.from_numpy(out)


class _SignalStack(ctypes.Structure):  # stack_t, <signal.h>
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Put the calling thread's alternate signal stack back as it was after the block (Linux).

    OpenVINO's compile_model installs a signal stack of its own (11,568 bytes, mmap'd) on the
    calling thread and later unmaps it without restoring the previous one. The thread is then left
    with a dangling sigaltstack: the next signal whose handler runs on it (faulthandler's,
    Python's SIGINT) cannot be delivered and the kernel kills the process with SIGSEGV, and until
    then the address can be reused by another mapping that a signal frame would overwrite. This is
    what crashed the full test suite in the main thread (openvino 2026.4, found by logging
    sigaltstack before every test: dangling from the first OpenVINO export onward)."""
    if sys.platform != "linux":
        yield
        return
    libc = c_library()
    old = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(old)) != 0:
        yield
        return
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(old), None)


class OpenVinoRuntime:
    """OpenVINO on the CPU, compiled from the bundle's ONNX file with a precision hint: "bf16" runs
    the fp32 graph on AVX512-BF16/AMX units, and the int8 QDQ graph runs on OpenVINO's int8
    kernels. Measured here on ResNet-18 at 224 px, batch 32: 216 img/s (bf16) vs 124 for ONNX
    Runtime fp32, and 462 img/s (int8) vs 384 for ONNX Runtime int8."""

    def __init__(self, path: str | Path, name: str = "openvino-bf16", hint: str = "bf16", threads: int = 0) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise ImageRecError(f"runtime {name} needs the openvino package: pip install openvino") from e
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads or available_cpus(), "INFERENCE_PRECISION_HINT": hint,
                  "PERFORMANCE_HINT": "LATENCY"}
        if threads and threads < available_cpus():
            # OpenVINO pins its threads to cores, and every compiled model picks the same first
            # ones: two 1-thread models on 2 cores both ran on core 0 (42 vs 89 img/s unpinned).
            config["ENABLE_CPU_PINNING"] = False
        try:
            with keep_signal_stack():
                self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as e:
            raise ImageRecError(f"{path}: OpenVINO cannot compile this model ({e})") from e
        self.name, self.path, self.hint = name, Path(path), hint

    def run(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        with keep_signal_stack():
            return torch.from_numpy(np.array(self.compiled(as_uint8(x))[0], dtype=np.float32))


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class TorchScriptRuntime:
    """A TorchScript archive loaded with torch.jit.load (TorchScript's loader, not pickle)."""

    def __init__(self, path: str | Path, name: str = "torchscript-fp32") -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
                self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:
            raise ImageRecError(f"{path}: cannot load this TorchScript file ({e})") from e
        self.name, self.path = name, Path(path)

    @torch.inference_mode()
    def run(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        t = x if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 else torch.from_numpy(as_uint8(x))
        return self.module(t).float()


class TorchRuntime:
    """Eager PyTorch on CPU: fp32, or bf16 autocast (the Predictor's own path for run directories)."""

    def __init__(self, model: nn.Module, pre: PreprocessConfig, amp_dtype: torch.dtype | None = None) -> None:
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.pre, self.amp_dtype = pre, amp_dtype
        self.name = "torch-bf16" if amp_dtype == torch.bfloat16 else "torch-fp32"

    @torch.inference_mode()
    def run(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        t = x if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 else torch.from_numpy(as_uint8(x))
        t = normalize_batch(t, self.pre.mean, self.pre.std).contiguous(memory_format=torch.channels_last)
        with autocast(torch.device("cpu"), self.amp_dtype):
            logits = self.model(t).float()
        return torch.sigmoid(logits) if self.pre.multi_label else torch.softmax(logits, dim=1)
