"""HLS Burn Scars (NASA/IBM, Harmonized Landsat-Sentinel S30), read from its release.

Unpack ``hls_burn_scars.tar.gz`` and point ``dataset.root`` at it::

    <root>/training/subsetted_512x512_HLS.S30.<tile>.<date>.v1.4_merged.tif   6 bands, float32
    <root>/training/subsetted_512x512_HLS.S30.<tile>.<date>.v1.4.mask.tif     1 band
    <root>/validation/...                                                     (same naming)

Bands in file order: B2, B3, B4, B8A, B11, B12 (reflectance); 9999 means no data. Mask: 1 burn
scar, 0 not burned, -1 missing (ignored). Each sample also carries ``temporal_coords`` (year, day
of year, from ``<date>`` = YYYYDDD in the name) and ``location_coords`` (latitude, longitude of
the chip's centre, from its georeferencing) for Prithvi-EO-2.0 TL. The release has two folders: ``validation/`` is the
test split, and train/val are a seeded split of ``training/`` (``val_fraction``, ``split_seed``;
:func:`deflect.rasters.seeded_split`, the rule of every seeded split), so model selection never
sees the test files.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch

from datasets.base import GeoTIFFSegmentationDataset, Sample
from deflect.rasters import seeded_split

IMAGE_SUFFIX = "_merged.tif"
MASK_SUFFIX = ".mask.tif"
DATE = re.compile(r"\.(\d{4})(\d{3})\.v")  # HLS.S30.<tile>.<YYYYDDD>.v1.4


class HLSBurnScars(GeoTIFFSegmentationDataset):
    """HLS Burn Scars in its released layout (see the module docstring).

    Args:
        val_fraction: share of ``training/`` chips held out for validation.
        split_seed: seed of that split (fixed: the same chips on every run and every machine).
        **kwargs: those of :class:`~datasets.base.GeoTIFFSegmentationDataset`.
    """

    available_bands: ClassVar[list[str]] = ["B2", "B3", "B4", "B8A", "B11", "B12"]
    nodata: ClassVar[float | None] = 9999
    sensor: ClassVar[str] = "sentinel2a"
    gsd: ClassVar[float | None] = 30.0
    layout: ClassVar[str] = (
        "<root>/{training,validation}/subsetted_512x512_HLS.S30.<tile>.<date>.v1.4_merged.tif "
        "+ ...v1.4.mask.tif"
    )

    def __init__(self, *, val_fraction: float = 0.1, split_seed: int = 0, **kwargs: Any) -> None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"HLSBurnScars: val_fraction={val_fraction} must be in (0, 1)")
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        super().__init__(**kwargs)

    def chips(self, folder: str) -> list[Sample]:
        """Image/mask pairs of ``<root>/<folder>``, sorted by name."""
        samples = []
        for image in sorted((self.root / folder).glob(f"*{IMAGE_SUFFIX}")):
            name = image.name[: -len(IMAGE_SUFFIX)]
            mask = image.with_name(name + MASK_SUFFIX)
            if not mask.is_file():
                raise FileNotFoundError(
                    f"HLSBurnScars: image {str(image)!r} has no mask {str(mask)!r}; restore it or "
                    "re-extract hls_burn_scars.tar.gz"
                )
            samples.append(Sample(name=name, mask=mask, images={"image": image}))
        return samples

    def list_samples(self, split: str) -> list[Sample]:
        """``test``: ``validation/``; ``train``/``val``: the seeded split of ``training/``."""
        if split == "test":
            return self.chips("validation")
        return seeded_split(self.chips("training"), split, self.val_fraction, 0.0, self.split_seed)

    def sample_metadata(self, index: int) -> dict[str, torch.Tensor]:
        """``gsd``, ``temporal_coords`` (year, day of year) and ``location_coords`` (latitude,
        longitude of the chip's centre), cached per chip."""
        cache = self.__dict__.setdefault("_metadata", {})
        if index not in cache:
            meta = super().sample_metadata(index)
            date = DATE.search(self.samples[index].name)
            if date:
                meta["temporal_coords"] = torch.tensor([float(date[1]), float(date[2])])
            centre = self.centre_lat_lon(index)
            if centre is not None:
                meta["location_coords"] = torch.tensor(centre, dtype=torch.float32)
            cache[index] = meta
        return cache[index]
