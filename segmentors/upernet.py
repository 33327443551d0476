"""UperNet decode head (Xiao et al., ECCV 2018): pyramid pooling on the coarsest level, an FPN
top-down path with lateral 1x1 and output 3x3 convolutions, fusion of all levels, and a 1x1
classifier."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class _ReLUKeepingMask(torch.autograd.Function):
    """ReLU whose backward pass keeps a one-byte mask of the positive outputs rather than the
    float output: the same values and gradients as :func:`torch.relu`, a quarter of the memory
    where nothing after the ReLU keeps its output anyway."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(x)
        ctx.save_for_backward(out > 0)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (positive,) = ctx.saved_tensors
        return torch.where(positive, grad, grad.new_zeros(()))  # relu's threshold_backward


def relu_keeping_mask(x: torch.Tensor) -> torch.Tensor:
    """``torch.relu(x)``, keeping only a boolean mask for the backward pass (see
    :class:`_ReLUKeepingMask`); plain ReLU when no gradient is recorded."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.relu(x)
    return _ReLUKeepingMask.apply(x)


class ConvBNReLU(nn.Sequential):
    """Convolution, BatchNorm, ReLU: the unit every branch of UperNet is built from."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward_keeping_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The same as ``forward``, for a branch whose output is only added to others (UperNet's
        laterals): the backward pass keeps a boolean mask, not the float output."""
        conv, bn, _ = self
        return relu_keeping_mask(bn(conv(x)))


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
    return _place_taps(x, _taps(weight), size)


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel ``(C_out, C_in, 3, 3)`` as 9 stacked 1x1 kernels ``(9 C_out, C_in, 1, 1)``,
    tap-major (a copy: make it once per weight, not once per chunk)."""
    return weight.permute(2, 3, 0, 1).reshape(9 * weight.shape[0], -1, 1, 1)


def _place_taps(x: torch.Tensor, taps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`conv3x3_of_upsampled` with the kernel already in :func:`_taps` form."""
    b, _, h, w = x.shape
    c_out = taps.shape[0] // 9
    rows, cols = placement_matrices((h, w), tuple(size), x.device, x.dtype)
    z = F.conv2d(x, taps.to(x.dtype)).view(b, 3, 3, c_out, h, w)  # channels mixed at (h, w)
    z = torch.einsum("bijchw,jXw->bichX", z, cols)  # columns placed: (B, 3, C_out, h, W)
    return torch.einsum("bichX,iYh->bcYX", z, rows)  # rows placed and taps summed: (B, C_out, H, W)


# Largest per-chunk intermediate of conv3x3_of_upsampled (its 9 taps at low resolution) that
# add_conv3x3_of_upsampled_ builds at once. 32 MiB keeps UperNet-512's fusion transient small and
# was the fastest chunking on a 2-core CPU (batch 8, 28x28 -> 56x56: 1.85 s against 2.09 s for
# the whole batch at once, forward and backward).
FUSION_CHUNK_BYTES = 32 * 2**20


def add_conv3x3_of_upsampled_(
    out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, chunk_bytes: int = FUSION_CHUNK_BYTES
) -> torch.Tensor:
    """``out += conv3x3_of_upsampled(x, weight, out.shape[-2:])`` in place, a few samples at a
    time: the 9-tap intermediate (9 x ``C_out`` channels at ``x``'s resolution, larger than the
    result for a x2 level) exists for ``chunk_bytes`` worth of samples only, and no second
    full-size sum is made. The same function and gradients; only memory and speed change."""
    per_sample = 9 * weight.shape[0] * x.shape[-2] * x.shape[-1] * x.element_size()
    step = max(1, chunk_bytes // per_sample)
    size, taps = tuple(out.shape[-2:]), _taps(weight)
    for start in range(0, x.shape[0], step):
        out[start : start + step].add_(_place_taps(x[start : start + step], taps, size))
    return out


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
        laterals = [  # each lateral is only added to the upsampled level above it
            conv.forward_keeping_mask(f) if pre is None else pre
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
                add_conv3x3_of_upsampled_(fused, o, weight)
            return self.classify(relu(bn(fused)))
        outs = [outs[0]] + [
            F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]
        ]
        return self.classify(self.fusion(torch.cat(outs, dim=1)))

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """``classifier(dropout(z))``. In training, Dropout2d's per-sample channel mask (the same
        random draw) is folded into the 1x1 classifier's weights instead of applied to ``z``:
        the same function to float rounding, and the backward pass keeps only ``z`` (which its
        ReLU keeps anyway), not a second full-resolution map."""
        p = self.dropout.p
        if not (self.training and p > 0):
            return self.classifier(self.dropout(z))
        b, c, h, w = z.shape
        keep = F.dropout2d(z.new_ones(b, c, 1, 1), p, training=True)  # 0 or 1/(1-p) per channel
        weight = self.classifier.weight.flatten(1) * keep.view(b, 1, c)  # (B, classes, C)
        logits = torch.bmm(weight.to(z.dtype), z.flatten(2)).view(b, -1, h, w)
        bias = self.classifier.bias
        return logits if bias is None else logits + bias.view(1, -1, 1, 1).to(logits.dtype)
