"""TorchScript export: the inference graph traced and saved as a TorchScript archive.

A TorchScript archive is code plus tensors; `torch.jit.load` restores it with TorchScript's own
loader, not Python's pickle, so loading a bundle never unpickles arbitrary objects.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagerec.config import PreprocessConfig
from imagerec.export.graph import InferenceGraph, example_input
from imagerec.utils import ImageRecError


def export_torchscript(model: nn.Module, pre: PreprocessConfig, path: str | Path) -> dict[str, Any]:
    """Trace `model` behind the uint8 -> probabilities graph and save it to `path`.

    Example:
        >>> export_torchscript(model, pre, "model.ts")
    """
    graph = InferenceGraph(model, pre).eval()
    archive = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(graph, (example_input(pre),), check_trace=False)
            torch.jit.save(traced, archive)
    except Exception as e:
        raise ImageRecError(f"cannot trace this model to TorchScript ({type(e).__name__}: {e}); try --format onnx") from e
    # Saved in memory, written here: PyTorch's own file writer aborts the whole process (SIGABRT,
    # a C++ stack trace) when the disk is full; a Python write raises an OSError the caller reports.
    Path(path).write_bytes(archive.getvalue())
    return {"exporter": "torch.jit.trace", "torch": torch.__version__, "input_dtype": "uint8",
            "input_shape": ["batch", pre.channels, pre.input_size, pre.input_size]}
