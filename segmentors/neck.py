"""The ViT feature-pyramid neck: one plain ViT resolution turned into four.

A ViT gives maps at a single stride (the patch size). UperNet wants a pyramid, so the maps of
the chosen layers are resampled by x4, x2, x1 and x0.5 (transposed convolutions up, max-pooling
down), as in ViTDet / BEiT's segmentation setups.
"""

from __future__ import annotations

import torch
from torch import nn


def _upsample(channels: int, factor: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    while factor > 1:
        layers += [nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)]
        factor //= 2
        if factor > 1:
            layers += [nn.BatchNorm2d(channels), nn.GELU()]
    return nn.Sequential(*layers)


class ViTFeaturePyramid(nn.Module):
    """Resample four same-stride ViT maps to strides p/4, p/2, p and 2p.

    Args:
        in_channels: channels of each input map (four entries).
        scales: resampling factor of each level; 4, 2, 1 and 0.5 are supported.
    """

    def __init__(
        self, in_channels: list[int], scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)
    ) -> None:
        super().__init__()
        if len(in_channels) != len(scales):
            raise ValueError(
                f"the feature pyramid needs one encoder output per scale: got "
                f"{len(in_channels)} output layers for scales {list(scales)}; set "
                f"encoder.output_layers to {len(scales)} block indices"
            )
        ops: list[nn.Module] = []
        for channels, scale in zip(in_channels, scales):
            if scale >= 1 and float(scale).is_integer() and int(scale) & (int(scale) - 1) == 0:
                ops.append(_upsample(channels, int(scale)) if scale > 1 else nn.Identity())
            elif scale == 0.5:
                ops.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                raise ValueError(f"unsupported pyramid scale {scale}; use 4, 2, 1 or 0.5")
        self.ops = nn.ModuleList(ops)
        self.scales = tuple(scales)
        self.out_channels = list(in_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Map four ``(B, C_i, h, w)`` tensors to ``(B, C_i, h*s_i, w*s_i)``."""
        return [op(f) for op, f in zip(self.ops, features)]
