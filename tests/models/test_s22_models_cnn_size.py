"""cnn/cnn-large refuse an input size their poolings bring below 1 px, naming the size, when built."""

from __future__ import annotations

import pytest
import torch

from imagerec.models import create_model
from imagerec.utils import ImageRecError


@pytest.mark.parametrize(("name", "size", "kwargs"), [("cnn", 4, {}), ("cnn-large", 7, {}), ("cnn", 8, {"widths": (8, 8, 8, 8)})])
def test_too_small_input_refused_when_built(name: str, size: int, kwargs: dict) -> None:
    with pytest.raises(ImageRecError, match=rf"leaves nothing of {size} px images: use --image-size"):
        create_model(name, num_classes=3, in_chans=1, img_size=size, **kwargs)


def test_smallest_input_still_builds_and_runs() -> None:
    model = create_model("cnn", num_classes=3, in_chans=1, img_size=8).eval()
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 3)
