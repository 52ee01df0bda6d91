"""ONNX export of the inference graph (uint8 images -> probabilities) with a dynamic batch axis.

The dynamo exporter (`torch.onnx.export(..., dynamo=True)`, torch.export-based and the default
since torch 2.9) is tried first; the TorchScript-based exporter is the fallback for a model that
torch.export cannot capture. Which one ran is recorded in the bundle.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagerec.config import PreprocessConfig
from imagerec.export.graph import InferenceGraph, example_input
from imagerec.utils import ImageRecError

OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "probs"
log = logging.getLogger(__name__)


def export_onnx(model: nn.Module, pre: PreprocessConfig, path: str | Path) -> dict[str, Any]:
    """Write `path` (a single self-contained .onnx file); returns {"exporter", "opset", ...}.

    Example:
        >>> export_onnx(create_model("cnn", 10, in_chans=1, img_size=28), pre, "model.onnx")
    """
    import onnx

    graph = InferenceGraph(model, pre).eval()
    x = example_input(pre)
    path = Path(path)
    errors = []
    for exporter in ("dynamo", "torchscript"):
        try:
            _run_exporter(graph, x, path, exporter)
            break
        except Exception as e:  # noqa: BLE001 - any exporter failure means: try the other one
            if isinstance(e, OSError) and e.errno is not None:
                raise  # writing the file failed (a full disk): not the model's fault, and the other exporter writes it too
            errors.append(f"{exporter}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            log.info("ONNX %s exporter failed, trying the next: %s", exporter, errors[-1])
    else:
        raise ImageRecError(f"cannot export this model to ONNX ({'; '.join(errors)}); try --format torchscript")
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    return {"exporter": exporter, "opset": int(opset), "onnx": onnx.__version__, "input": INPUT_NAME, "output": OUTPUT_NAME,
            "input_dtype": "uint8", "input_shape": ["batch", pre.channels, pre.input_size, pre.input_size]}


def _run_exporter(graph: nn.Module, x: torch.Tensor, path: Path, exporter: str) -> None:
    # The exporters print progress and raise many warnings about internals; a user sees the result.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            program = torch.onnx.export(graph, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes={"x": {0: batch}}, opset_version=OPSET, verbose=False)
            assert program is not None
            program.save(str(path), external_data=False)  # one file: the bundle hashes what it lists
        else:
            torch.onnx.export(graph, (x,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=17)
