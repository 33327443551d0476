"""Tiling of images larger than the encoder input: one module for evaluation and scene prediction.

Evaluation runs a test image through :func:`sliding_window_logits` (``window`` x ``window``
tiles every ``stride`` pixels, the last flush with the edge, logits averaged over the tiles
covering a pixel). Scene prediction (:mod:`deflect.predict`) lays the same global grid over a
scene of any size (:class:`TileGrid`) but computes it block by block (:func:`blocks`): for each
output block only the tiles that meet it (:func:`intersecting`) are run, and their sum is
divided by the number of tiles covering each pixel (:func:`coverage_counts`). Both take their
tile starts from :func:`window_starts`, so the two give the same map pixel for pixel.

A low-layer module: it depends on torch and numpy only, never on the engine or the tasks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
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


# ------------------------------------------------------------------- the grid, block by block


def round_block(block: int, stride: int) -> int:
    """``block`` rounded down to a multiple of ``stride`` (at least one stride)."""
    if block < 1:
        raise ValueError(f"block={block} must be >= 1 pixel")
    return max(stride, block // stride * stride)


def coverage_counts(length: int, window: int, stride: int) -> np.ndarray:
    """How many tiles of the grid along one axis cover each of ``length`` pixels (float32).

    The grid is :func:`window_starts` over ``max(length, window)`` (a scene smaller than the
    window is padded to it). The count of 2-D tiles covering a pixel is the product of its
    row's and its column's counts.
    """
    counts = np.zeros(max(length, window), dtype=np.float32)
    for start in window_starts(max(length, window), window, stride):
        counts[start : start + window] += 1
    return counts[:length]


def intersecting(starts: Sequence[int], lo: int, hi: int, window: int) -> list[int]:
    """The tile starts of ``starts`` whose tile ``[start, start + window)`` meets ``[lo, hi)``."""
    return [s for s in starts if s < hi and s + window > lo]


def blocks(height: int, width: int, block: int) -> Iterator[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of the output blocks, row by row."""
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            yield y0, min(y0 + block, height), x0, min(x0 + block, width)


class TileGrid:
    """The global tile grid of an image, as :func:`sliding_window_logits` lays it over the whole
    image: tile starts and coverage counts along both axes.

    Args:
        height, width: the image's size in pixels.
        window: the tile side.
        stride: the tile step.
    """

    def __init__(self, height: int, width: int, window: int, stride: int) -> None:
        self.height, self.width = height, width
        self.starts_y = window_starts(max(height, window), window, stride)
        self.starts_x = window_starts(max(width, window), window, stride)
        self.counts_y = coverage_counts(height, window, stride)
        self.counts_x = coverage_counts(width, window, stride)
