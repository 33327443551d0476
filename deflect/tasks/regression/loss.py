"""The losses of pixel-wise regression: L1, MSE or Huber over the pixels with a valid target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: ``loss.name`` -> the element-wise loss (``reduction="none"``).
LOSSES = {
    "l1": lambda p, y, delta: F.l1_loss(p, y, reduction="none"),
    "mse": lambda p, y, delta: F.mse_loss(p, y, reduction="none"),
    "huber": lambda p, y, delta: F.huber_loss(p, y, reduction="none", delta=delta),
}


class RegressionLoss(nn.Module):
    """The mean of an element-wise loss over the valid target values (finite; NaN marks a pixel
    without a target), optionally weighted per target: ``Σ w_t l / Σ w_t`` over valid values.

    A batch without a valid value gives 0 with a zero gradient (still connected to the output,
    so every parameter receives a gradient under DDP).

    Args:
        name: ``l1``, ``mse`` or ``huber``.
        delta: Huber's threshold between its quadratic and linear parts (target units).
        target_weights: one non-negative weight per target, or None (all 1).
    """

    def __init__(self, name: str = "l1", delta: float = 1.0, target_weights=None) -> None:
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"loss.name={name!r}: use one of {sorted(LOSSES)}")
        if not (isinstance(delta, (int, float)) and delta > 0):
            raise ValueError(f"loss.delta={delta!r}: Huber's threshold must be a number > 0")
        weights = None
        if target_weights is not None:
            weights = torch.tensor([float(w) for w in target_weights], dtype=torch.float32)
            if not (torch.isfinite(weights).all() and (weights >= 0).all() and weights.sum() > 0):
                raise ValueError(
                    f"loss.target_weights={list(target_weights)}: expected finite weights >= 0, "
                    "not all 0, one per target"
                )
        self.register_buffer("weight", weights, persistent=False)
        self.name = name
        self.delta = float(delta)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``output`` and ``target`` ``(B, T, H, W)``; the scalar loss."""
        output = output.float()
        valid = torch.isfinite(target)
        # NaN targets replaced before the loss, so their (masked) terms have finite gradients.
        filled = torch.where(valid, target, output.detach())
        weight = valid.float()
        if self.weight is not None:
            if self.weight.numel() != output.shape[1]:
                raise ValueError(
                    f"loss.target_weights has {self.weight.numel()} weights for "
                    f"{output.shape[1]} targets: give one per target"
                )
            weight = weight * self.weight.view(1, -1, *[1] * (output.dim() - 2))
        losses = LOSSES[self.name](output, filled, self.delta)
        total = weight.sum()
        return (losses * weight).sum() / torch.where(total > 0, total, 1.0)
