"""Lookahead averaging of the weights, airbench94's schedule.

Every 5 steps the slow copy moves toward the live weights, `ema = lerp(ema, net, 1 - decay)`,
and the live weights are reset to it. `decay` grows as `0.95**5 * (step / total)**3`: early on
the average barely lags the weights, late in training it smooths the last noisy steps, and at
the final step the net becomes the average. BN running statistics are averaged too.
"""

from __future__ import annotations

import torch


class Lookahead:
    every = 5

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, decay: float) -> None:
        live = self.model.state_dict()
        for k, slow in self.ema.items():
            slow.lerp_(live[k], 1.0 - decay)
            live[k].copy_(slow)

    def step(self, step: int, total: int) -> None:
        """Call after optimizer step number `step` (1-based) of `total`."""
        if step >= total:
            self.update(1.0)  # the final weights are the average
        elif step % self.every == 0:
            self.update(0.95**5 * (step / total) ** 3)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"lookahead.{k}": v.detach().contiguous().cpu().clone() for k, v in self.ema.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, slow in self.ema.items():
            slow.copy_(tensors[f"lookahead.{k}"])
