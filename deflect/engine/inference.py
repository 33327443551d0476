"""Sliding-window inference for images larger (or not a multiple) of the encoder input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with windows of ``window`` pixels; the last is flush."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module,
    images: torch.Tensor,
    window: int,
    stride: int,
    num_classes: int,
    **metadata: torch.Tensor,
) -> torch.Tensor:
    """Logits ``(B, K, H, W)`` averaged over overlapping ``window`` x ``window`` tiles.

    Images smaller than the window are padded with NaN at the bottom/right, the invalid-pixel
    value training crops pad with too, and the padding is cropped from the result. An image
    exactly the window size runs in one forward pass. ``metadata`` (e.g. a per-sample GSD) goes
    to every forward.
    """
    b, _, h, w = images.shape
    pad_h, pad_w = max(window - h, 0), max(window - w, 0)
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), value=torch.nan)
    hp, wp = images.shape[-2:]
    if hp == window and wp == window:
        return model(images, **metadata)[..., :h, :w].float()
    logits = images.new_zeros((b, num_classes, hp, wp), dtype=torch.float32)
    counts = images.new_zeros((1, 1, hp, wp), dtype=torch.float32)
    for top in window_starts(hp, window, stride):
        for left in window_starts(wp, window, stride):
            tile = images[..., top : top + window, left : left + window]
            logits[..., top : top + window, left : left + window] += model(tile, **metadata).float()
            counts[..., top : top + window, left : left + window] += 1
    return (logits / counts)[..., :h, :w]
