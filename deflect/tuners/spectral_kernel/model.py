"""The ``spectral_kernel`` tuner: the frozen encoder with a trainable all-band patch kernel.

The band strategy (:mod:`deflect.tuners.bands`, shared by every competitor) builds the kernel and
makes it trainable; everything else of the encoder stays frozen, as under ``frozen``. With
``new_bands_only`` the kernel is a :class:`NewBandsKernel`: the pretrained bands' columns a
frozen buffer, the new bands' columns the only parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from deflect.tuners.base import vit_parts
from deflect.tuners.frozen.model import FrozenTuner


class NewBandsKernel(nn.Module):
    """A patch kernel ``(D, C, *k)`` whose pretrained bands' columns are frozen (a buffer,
    saved with the adapter) and whose new bands' columns train.

    Args:
        weight: the all-band kernel the band strategy built.
        new: the input channels of the bands the encoder was not pretrained on.
    """

    def __init__(self, weight: torch.Tensor, new: list[int]) -> None:
        super().__init__()
        kept = [i for i in range(weight.shape[1]) if i not in new]
        self.register_buffer("pretrained", weight[:, kept].detach().clone())
        self.new = nn.Parameter(weight[:, new].detach().clone())
        order = torch.argsort(torch.tensor(kept + list(new)))
        self.register_buffer("order", order, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The all-band kernel in input-channel order (what the patch embedding runs)."""
        return torch.cat([self.pretrained, self.new], dim=1)[:, self.order]


class SpectralKernelTuner(FrozenTuner):
    """Every encoder parameter frozen; the all-band patch-embedding kernel (or, with
    ``new_bands_only``, its new bands' columns) trains."""

    def _inject_band_kernel(self, config, adapter_name: str) -> str:
        """The band strategy's kernel, split into frozen and trained columns when
        ``new_bands_only``."""
        replaced = super()._inject_band_kernel(config, adapter_name)
        if getattr(config, "new_bands_only", False):
            new = [i for i, b in enumerate(self.data.bands) if b not in self.pretrained_bands]
            if not new:
                raise ValueError(
                    f"new_bands_only: every input band {list(self.data.bands)} is a pretrained "
                    "one, so nothing would train; use finetune=frozen"
                )
            kernels = vit_parts(self.model).owner.patch_embed.bands_kernel
            kernels[adapter_name] = NewBandsKernel(kernels[adapter_name].weight, new)
        return replaced

    def band_usage(self) -> dict[str, str]:
        """The band strategy's table, the pretrained bands marked frozen under
        ``new_bands_only``."""
        usage = super().band_usage()
        if getattr(self.configs.get(self.active_adapter), "new_bands_only", False):
            for band in self.pretrained_bands:
                if band in usage:
                    usage[band] = "patch embedding (frozen): pretrained kernel"
        return usage
