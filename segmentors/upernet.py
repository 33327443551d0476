"""UperNet decode head (Xiao et al., ECCV 2018): pyramid pooling on the coarsest level, an FPN
top-down path with lateral 1x1 and output 3x3 convolutions, fusion of all levels, and a 1x1
classifier."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """Convolution, BatchNorm, ReLU: the unit every branch of UperNet is built from."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class PyramidPoolingModule(nn.Module):
    """Average-pool to each of ``pool_scales`` bins, project, upsample back and concatenate."""

    def __init__(self, in_channels: int, channels: int, pool_scales: tuple[int, ...]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBNReLU(in_channels, channels, 1))
            for scale in pool_scales
        )
        self.bottleneck = ConvBNReLU(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False)
            for stage in self.stages
        ]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


def interpolation_matrix(out_size: int, in_size: int, shift: int = 0) -> torch.Tensor:
    """``(out_size, in_size)``: row ``o`` holds the weights 1-D linear interpolation
    (``align_corners=False``, PyTorch's bilinear along one axis) gives output ``o + shift``; a
    row outside ``[0, out_size)`` is zero (a 3x3 convolution's zero padding)."""
    eye = torch.eye(in_size, dtype=torch.float64)[None]  # (1, in, in): basis vectors
    up = F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[0].T  # (out, in)
    out = torch.zeros_like(up)
    rows = torch.arange(out_size) + shift
    keep = (rows >= 0) & (rows < out_size)
    out[keep] = up[rows[keep]]
    return out


@torch.compiler.disable  # a cached constant: computed once per shape, outside compiled graphs
@functools.lru_cache(maxsize=64)
def placement_matrices(small, size, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3, H, h)`` and ``(3, W, w)``: the interpolation matrices from ``small = (h, w)`` to
    ``size = (H, W)`` (tuples) shifted by each 3x3 kernel offset (-1, 0, 1), cached per shape."""
    rows = torch.stack([interpolation_matrix(size[0], small[0], k - 1) for k in range(3)])
    cols = torch.stack([interpolation_matrix(size[1], small[1], k - 1) for k in range(3)])
    return rows.to(device, dtype), cols.to(device, dtype)


def conv3x3_of_upsampled(
    x: torch.Tensor, weight: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """``conv2d(interpolate(x, size, bilinear), weight, padding=1)`` without building the
    upsampled map: the channels are mixed at ``x``'s own resolution for each of the 9 kernel
    taps, then each tap's map is placed at full size by two small interpolation matrices (shifted
    by the tap, zero rows at the border). Upsampling, shifting and convolving are all linear, so
    this is the same function (and gradient), at a fraction of the cost when ``x`` is small.

    Args:
        x: ``(B, C_in, h, w)``.
        weight: ``(C_out, C_in, 3, 3)``.
        size: ``(H, W)`` of the upsampled map.
    """
    b, _, h, w = x.shape
    c_out = weight.shape[0]
    rows, cols = placement_matrices((h, w), tuple(size), x.device, x.dtype)
    taps = weight.permute(2, 3, 0, 1).reshape(9 * c_out, -1, 1, 1)  # (9 C_out, C_in, 1, 1)
    z = F.conv2d(x, taps.to(x.dtype)).view(b, 3, 3, c_out, h, w)  # channels mixed at (h, w)
    z = torch.einsum("bijchw,jXw->bichX", z, cols)  # columns placed: (B, 3, C_out, h, W)
    return torch.einsum("bichX,iYh->bcYX", z, rows)  # rows placed and taps summed: (B, C_out, H, W)


class UperNetHead(nn.Module):
    """UperNet on a feature pyramid ordered fine to coarse.

    Args:
        in_channels: channels of each pyramid level, finest first.
        num_classes: number of output classes.
        channels: width of every internal branch (512 in the original).
        pool_scales: bins of the pyramid pooling module.
        dropout: dropout before the classifier.
        fast_fusion: compute the fusion convolution over the upsampled levels at their own
            resolution (:func:`conv3x3_of_upsampled`; the same function and parameters). False
            builds the upsampled, concatenated map as written in the paper.
    """

    def __init__(
        self,
        in_channels: list[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        fast_fusion: bool = True,
    ) -> None:
        super().__init__()
        self.fast_fusion = fast_fusion
        self.ppm = PyramidPoolingModule(in_channels[-1], channels, tuple(pool_scales))
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fusion = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(
        self, features: list[torch.Tensor], laterals: list[torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        """Logits at the resolution of the finest level, ``(B, num_classes, h0, w0)``.

        ``laterals[i]``, when given, is level i's lateral branch already computed (the
        segmentor folds the 1x1 lateral convolution into the neck's last transposed convolution);
        ``features[i]`` is then not used.
        """
        given = laterals or [None] * (len(features) - 1)
        laterals = [
            conv(f) if pre is None else pre
            for conv, f, pre in zip(self.lateral_convs, features[:-1], given)
        ]
        laterals.append(self.ppm(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        if self.fast_fusion:
            conv, bn, relu = self.fusion
            weights = conv.weight.split([o.shape[1] for o in outs], dim=1)
            fused = F.conv2d(outs[0], weights[0], padding=1)
            for o, weight in zip(outs[1:], weights[1:]):
                fused = fused + conv3x3_of_upsampled(o, weight, tuple(size))
            return self.classifier(self.dropout(relu(bn(fused))))
        outs = [outs[0]] + [
            F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]
        ]
        return self.classifier(self.dropout(self.fusion(torch.cat(outs, dim=1))))
