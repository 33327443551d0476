"""Band strategies of DEFLECT's competitors: a patch embedding over every input band.

See :class:`~deflect.tuners.config.BandStrategyConfig` for the strategies. The pretrained patch
embedding module is kept (as ``base_layer``) and run with the adapter's kernel in place of its
own (``torch.func.functional_call``): its bias, normalisation, flattening and any shape checks are
the pretrained module's own, so BitFit still tunes the pretrained bias, and the same code serves a
2-D (``Conv2d``) and a tubelet (``Conv3d``) patch embedding.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from deflect.encoders.base import fill_invalid
from deflect.tuners.layer import BAND_PREFIX, AdapterLayer

__all__ = ["BAND_PREFIX", "BandKernel", "BandPatchEmbed", "band_kernel", "find_patch_conv"]


class BandKernel(nn.Module):
    """One adapter's patch-embedding kernel over all bands ``(D, C, *k)``: a parameter when it
    trains, a buffer otherwise (saved with the adapter either way)."""

    def __init__(self, weight: torch.Tensor, trainable: bool) -> None:
        super().__init__()
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)


def find_patch_conv(patch_embed: nn.Module, num_pretrained: int) -> str:
    """Name of the convolution of ``patch_embed`` that reads the ``num_pretrained`` input bands.

    Raises:
        ValueError: no such ``Conv2d``/``Conv3d``, or more than one.
    """
    hits = [
        name
        for name, m in patch_embed.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.in_channels == num_pretrained
    ]
    if len(hits) != 1:
        convs = [
            f"{n or '<self>'} ({type(m).__name__}, {m.in_channels} in)"
            for n, m in patch_embed.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Conv3d))
        ]
        raise ValueError(
            f"band_strategy needs exactly one convolution over the {num_pretrained} pretrained "
            f"bands in {type(patch_embed).__name__}; found {len(hits)} among {convs or 'none'}; "
            "use band_strategy=rgb for this encoder"
        )
    return hits[0]


def kernel_sources(bands: list[str], pretrained_bands: list[str]) -> list[int]:
    """For each input band, the pretrained kernel slice ``repeat`` gives it: its own for a
    pretrained band, the pretrained slices in turn for the others."""
    sources, turn = [], 0
    for band in bands:
        if band in pretrained_bands:
            sources.append(pretrained_bands.index(band))
        else:
            sources.append(turn % len(pretrained_bands))
            turn += 1
    return sources


def band_kernel(
    pretrained: torch.Tensor, bands: list[str], pretrained_bands: list[str], strategy: str
) -> torch.Tensor:
    """The kernel over all ``bands`` from the pretrained one ``(D, P, *k)`` under ``strategy``.

    ``repeat``: slice ``kernel_sources(...)[c]`` for band c, times P/C. ``rgb_random``: the
    pretrained slice for a pretrained band, PyTorch's convolution initialisation (Kaiming uniform
    with a = √5 over a fan-in of C·k) for the others.
    """
    weight = pretrained.detach().float()
    c, p = len(bands), len(pretrained_bands)
    if strategy == "repeat":
        out = weight[:, kernel_sources(bands, pretrained_bands)] * (p / c)
    elif strategy == "rgb_random":
        shape = (weight.shape[0], c, *weight.shape[2:])
        out = torch.empty(shape, device=weight.device)
        nn.init.kaiming_uniform_(out, a=math.sqrt(5))
        for i, band in enumerate(bands):
            if band in pretrained_bands:
                out[:, i] = weight[:, pretrained_bands.index(band)]
    else:
        raise ValueError(f"band strategy {strategy!r} builds no kernel")
    return out.to(pretrained.dtype)


class BandPatchEmbed(AdapterLayer):
    """The pretrained patch embedding, run over every band with an adapter's kernel.

    Takes every band (``takes_all_bands``); invalid (NaN) pixels reach it as 0. Adapters without
    a kernel here, and disabled adapters, get the pretrained module on the pretrained bands.

    Args:
        base_layer: the pretrained patch embedding.
        conv_name: its convolution over the pretrained bands (see :func:`find_patch_conv`).
        pretrained_index: input channels of the pretrained bands, in the pretrained order.
    """

    takes_all_bands = True

    def __init__(self, base_layer: nn.Module, conv_name: str, pretrained_index: list[int]) -> None:
        super().__init__(base_layer)
        self.bands_kernel = nn.ModuleDict()
        self.conv_name = conv_name
        self.pretrained_index = list(pretrained_index)

    @property
    def kernel_key(self) -> str:
        """The pretrained kernel's name inside ``base_layer``."""
        return f"{self.conv_name}.weight" if self.conv_name else "weight"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All bands ``(B, C, H, W)`` (or ``(B, C, T, H, W)``) -> patch tokens."""
        x = fill_invalid(x)
        name = self.active_adapter
        if self.disable_adapters or name not in self.bands_kernel:
            return self.base_layer(x[:, self.pretrained_index])
        kernel = self.bands_kernel[name].weight
        if x.shape[1] != kernel.shape[1]:
            raise ValueError(
                f"adapter {name!r} takes {kernel.shape[1]} bands, got {x.shape[1]} channels"
            )
        return functional_call(self.base_layer, {self.kernel_key: kernel}, (x,))
