"""The refusal of an export checked on unlabelled (synthetic) images reads as one sentence."""

from __future__ import annotations

import torch

from imagerec.config import PreprocessConfig
from imagerec.export.parity import compare, refusal_message, synthetic_images


def test_refusal_without_a_split_has_no_double_space() -> None:
    pre = PreprocessConfig(8, 1, (0.5,), (0.25,), 8, ("a", "b"))
    images = synthetic_images(pre, 4)
    ref = torch.tensor([[0.9, 0.1]] * 4)
    res = compare(ref, ref.flip(1), images, "fp32")
    text = refusal_message("onnx-fp32", res, "the given model")
    assert "on 4/4 images of synthetic" in text and "  " not in text
