"""Export: parity-gated bundles (ONNX, TorchScript, ONNX int8) and the runtimes that run them on CPU.

Example:
    >>> from imagerec.export import export_run, load_bundle
    >>> export_run("runs/mnist", "onnx", "exports/mnist", int8=True)
    >>> load_bundle("exports/mnist").create_runtime().run(uint8_batch)   # (B, K) probabilities
"""

from imagerec.export.api import (
    FORMATS,
    export_command,
    export_model,
    export_run,
    summarize_export,
)
from imagerec.export.bench import benchmark, benchmark_command
from imagerec.export.bundle import Bundle, is_bundle, load_bundle, verify_bundle
from imagerec.export.parity import ImageSet, load_images, synthetic_images
from imagerec.export.runtime import (
    OrtRuntime,
    Runtime,
    TorchRuntime,
    TorchScriptRuntime,
)

__all__ = [
    "FORMATS",
    "Bundle",
    "ImageSet",
    "OrtRuntime",
    "Runtime",
    "TorchRuntime",
    "TorchScriptRuntime",
    "benchmark",
    "benchmark_command",
    "export_command",
    "export_model",
    "export_run",
    "is_bundle",
    "load_bundle",
    "load_images",
    "summarize_export",
    "synthetic_images",
    "verify_bundle",
]
