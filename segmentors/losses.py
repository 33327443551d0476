"""Segmentation losses: cross-entropy with ignore_index, optional class weights and dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def class_weight_tensor(class_weights: list[float] | None, num_classes: int) -> torch.Tensor | None:
    """``loss.class_weights`` as a float32 tensor (``None`` when unset), one per class."""
    if class_weights is not None and len(class_weights) != num_classes:
        raise ValueError(
            f"loss.class_weights has {len(class_weights)} entries for {num_classes} classes"
        )
    return torch.tensor(class_weights, dtype=torch.float32) if class_weights else None


class SegmentationLoss(nn.Module):
    """Cross-entropy (ignoring ``ignore_index``) plus ``dice_weight`` x soft multi-class dice.

    Args:
        num_classes: number of classes.
        ignore_index: label value excluded from the loss.
        class_weights: optional per-class weights of the cross-entropy.
        dice_weight: weight of the dice term; 0 disables it.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = -1,
        class_weights: list[float] | None = None,
        dice_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", class_weight_tensor(class_weights, num_classes),
                             persistent=False)  # fmt: skip
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over labelled pixels; ``logits`` (B, K, H, W), ``target`` (B, H, W)."""
        logits = logits.float()
        loss = F.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_index)
        if self.dice_weight > 0:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss

    def dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """1 - mean soft dice over classes, on labelled pixels only."""
        valid = (target != self.ignore_index).unsqueeze(1)  # (B, 1, H, W)
        probs = logits.softmax(dim=1) * valid
        onehot = F.one_hot(target.clamp(min=0), self.num_classes).permute(0, 3, 1, 2) * valid
        inter = (probs * onehot).sum(dim=(0, 2, 3))
        union = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
        return 1 - ((2 * inter + 1.0) / (union + 1.0)).mean()
