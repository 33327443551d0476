"""Configuration of the ``spectral_kernel`` baseline.

The simplest way to give a frozen RGB encoder the rest of the spectrum: a new patch-embedding
kernel over every band (the pretrained kernel for the pretrained bands, a random one for the
others: ``band_strategy: rgb_random``) is the only encoder part that trains, ``D·C·p²``
parameters. Nobody's comparison of parameter-efficient methods for multispectral data has this
row, and it is the first baseline a spectral adapter such as DEFLECT must beat at its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from deflect.tuners.config import BandStrategyConfig


@dataclass
class SpectralKernelConfig(BandStrategyConfig):
    """Encoder frozen but for a patch-embedding kernel over every band, which trains.

    Args:
        band_strategy: how the new kernel starts: ``rgb_random`` (the default: pretrained
            slices for the pretrained bands, random ones for the rest) or ``repeat``.
        train_patch_embed: must be true (or null): the kernel is what this method trains.
    """

    method: str = "spectral_kernel"
    band_strategy: str = "rgb_random"
    train_patch_embed: bool | None = True

    def __post_init__(self) -> None:
        if self.band_strategy == "rgb":
            raise ValueError(
                "spectral_kernel needs a kernel over every band: band_strategy rgb_random or "
                "repeat (with rgb it would be the frozen baseline)"
            )
        if self.train_patch_embed is False:
            raise ValueError("spectral_kernel trains its kernel: train_patch_embed must be true")
        self.train_patch_embed = True
        super().__post_init__()
