"""Configuration of the ``spectral_kernel`` baseline.

The simplest way to give a frozen RGB encoder the rest of the spectrum: a new patch-embedding
kernel over every band (the pretrained kernel for the pretrained bands, a random one for the
others: ``band_strategy: rgb_random``) is the only encoder part that trains, ``D·C·p²``
parameters. Nobody's comparison of parameter-efficient methods for multispectral data has this
row, and it is the first baseline a spectral adapter such as DEFLECT must beat at its budget.

``new_bands_only: true`` (``finetune=spectral_kernel_new``) is the budget-matched variant: the
pretrained bands' kernel columns stay the pretrained ones, frozen, and only the new bands'
columns train, ``D·(C - P)·p²`` parameters: DEFLECT's premise (the pretrained spatial prior kept
intact, only the new spectrum learned) at about DEFLECT's count.
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
        new_bands_only: train only the kernel columns of the bands the encoder was not
            pretrained on; the pretrained columns stay frozen (needs ``rgb_random``, whose
            pretrained columns are the pretrained kernel itself).
    """

    method: str = "spectral_kernel"
    band_strategy: str = "rgb_random"
    train_patch_embed: bool | None = True
    new_bands_only: bool = False

    def __post_init__(self) -> None:
        if self.band_strategy == "rgb":
            raise ValueError(
                "spectral_kernel needs a kernel over every band: band_strategy rgb_random or "
                "repeat (with rgb it would be the frozen baseline)"
            )
        if self.train_patch_embed is False:
            raise ValueError("spectral_kernel trains its kernel: train_patch_embed must be true")
        if self.new_bands_only and self.band_strategy != "rgb_random":
            raise ValueError(
                f"new_bands_only keeps the pretrained columns as they were pretrained: "
                f"band_strategy={self.band_strategy!r} rescales them; use rgb_random"
            )
        self.train_patch_embed = True
        super().__post_init__()
