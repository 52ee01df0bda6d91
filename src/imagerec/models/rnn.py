"""`rnn` / `rnn-gru`: read an image row by row with a bidirectional recurrent net."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagerec.models._registry import register_model
from imagerec.models.base import Classifier
from imagerec.utils import ImageRecError

_CELLS: dict[str, type[nn.LSTM] | type[nn.GRU]] = {"lstm": nn.LSTM, "gru": nn.GRU}


class RowRNN(Classifier):
    """Each image row (all channels) is one time step; the mean of the outputs over time is pooled."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        img_size: int = 224,
        cell: str = "lstm",
        hidden_size: int = 128,
        num_layers: int = 2,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if cell not in _CELLS:
            raise ImageRecError(f"unknown rnn cell '{cell}': use one of {sorted(_CELLS)}")
        self.in_chans = in_chans
        # The per-step input size is fixed at build time; rows of another width are resampled to it.
        self.row_width = img_size
        self.rnn = _CELLS[cell](
            input_size=in_chans * img_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=drop_rate if num_layers > 1 else 0.0,
        )
        self.num_features = 2 * hidden_size
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if W != self.row_width:
            # Any height works (it is the sequence length); width must match the LSTM's input size.
            x = F.adaptive_avg_pool2d(x, (H, self.row_width))
            W = self.row_width
        x = x.permute(0, 2, 1, 3).reshape(B, H, C * W)  # (B, H, C*W): one row per time step
        out, _ = self.rnn(x)  # (B, H, 2*hidden)
        return out.mean(dim=1)  # (B, 2*hidden)


@register_model("rnn")
def rnn(num_classes: int, in_chans: int = 3, img_size: int = 224, **kwargs: Any) -> nn.Module:
    """Bidirectional 2-layer LSTM reading image rows as a sequence."""
    return RowRNN(num_classes, in_chans, img_size, **kwargs)


@register_model("rnn-gru")
def rnn_gru(num_classes: int, in_chans: int = 3, img_size: int = 224, **kwargs: Any) -> nn.Module:
    """Bidirectional 2-layer GRU reading image rows as a sequence."""
    kwargs.setdefault("cell", "gru")
    return RowRNN(num_classes, in_chans, img_size, **kwargs)
