"""MADOS: Marine Debris and Oil Spill (Kikaki et al., ISPRS J. 2024), read from its release.

Sentinel-2 ACOLITE Rayleigh-corrected reflectance (float), one band per file, 240×240 crops;
unzip ``MADOS.zip`` (Zenodo record 10664073) and point ``dataset.root`` at it::

    <root>/splits/{train,val,test}_X.txt                       crop ids, e.g. Scene_0_1
    <root>/Scene_<n>/10/Scene_<n>_L2R_rhorc_<nm>_<crop>.tif     10 m bands (B2, B3, B4, B8)
    <root>/Scene_<n>/20/Scene_<n>_L2R_rhorc_<nm>_<crop>.tif     20 m bands, 120×120
    <root>/Scene_<n>/60/Scene_<n>_L2R_rhorc_<nm>_<crop>.tif     60 m band (B1), 40×40
    <root>/Scene_<n>/10/Scene_<n>_L2R_cl_<crop>.tif             class mask (0 = unlabelled)

Band files are named by wavelength ``<nm>``, which differs slightly between S2A and S2B, so
each band is matched by a wavelength range. Coarser bands are upsampled to the mask's grid by
nearest neighbour on read. Files are not georeferenced. NaN pixels stay invalid (NaN), as
everywhere in this framework.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import numpy as np

from datasets.base import GeoTIFFSegmentationDataset, Sample, raster_shape, read_raster

MADOS_CLASSES = [
    "Marine Debris", "Dense Sargassum", "Sparse Floating Algae", "Natural Organic Material",
    "Ship", "Oil Spill", "Marine Water", "Sediment-Laden Water", "Foam", "Turbid Water",
    "Shallow Water", "Waves & Wakes", "Oil Platform", "Jellyfish", "Sea snot",
]  # fmt: skip

#: band -> (resolution folder, lowest and highest wavelength in nm used in file names)
MADOS_BANDS: dict[str, tuple[str, int, int]] = {
    "B1": ("60", 440, 444), "B2": ("10", 490, 494), "B3": ("10", 558, 561),
    "B4": ("10", 663, 666), "B5": ("20", 703, 705), "B6": ("20", 738, 741),
    "B7": ("20", 779, 784), "B8": ("10", 832, 834), "B8A": ("20", 863, 866),
    "B11": ("20", 1608, 1615), "B12": ("20", 2184, 2203),
}  # fmt: skip

_BAND_FILE = re.compile(r"^(Scene_\d+)_L2R_rhorc_(\d+)_(\d+)\.tif$")
_MASK_FILE = re.compile(r"^(Scene_\d+)_L2R_cl_(\d+)\.tif$")


def upsample_nearest(band: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``band`` (h, w) to ``shape`` (H, W): pixel (i, j) takes
    source pixel (i·h // H, j·w // W), i.e. each coarse pixel covers an equal block."""
    h, w = band.shape
    rows = np.arange(shape[0]) * h // shape[0]
    cols = np.arange(shape[1]) * w // shape[1]
    return band[rows[:, None], cols[None, :]]


class MADOS(GeoTIFFSegmentationDataset):
    """MADOS in its released layout (see the module docstring). Arguments are those of
    :class:`~datasets.base.GeoTIFFSegmentationDataset`."""

    available_bands: ClassVar[list[str]] = list(MADOS_BANDS)
    label_offset: ClassVar[int] = 1  # stored 0 = unlabelled -> ignore; 1..15 -> 0..14
    georeferenced: ClassVar[bool] = False
    sensor: ClassVar[str] = "sentinel2a"
    gsd: ClassVar[float | None] = 10.0
    layout: ClassVar[str] = (
        "<root>/splits/<split>_X.txt and <root>/Scene_<n>/{10,20,60}/"
        "Scene_<n>_L2R_rhorc_<nm>_<crop>.tif + Scene_<n>/10/Scene_<n>_L2R_cl_<crop>.tif"
    )

    def list_samples(self, split: str) -> list[Sample]:
        """Crops listed in ``splits/<split>_X.txt`` that have a mask, with every band file."""
        split_file = self.root / "splits" / f"{split}_X.txt"
        if not split_file.is_file():
            raise FileNotFoundError(
                f"MADOS: split file {str(split_file)!r} does not exist; dataset.root must be the "
                "unzipped MADOS folder (holding splits/ and Scene_*/)"
            )
        wanted = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        masks = {}
        for path in self.root.glob("Scene_*/10/Scene_*_L2R_cl_*.tif"):
            match = _MASK_FILE.match(path.name)
            if match:
                masks[f"{match.group(1)}_{match.group(2)}"] = path
        missing = [crop for crop in wanted if crop not in masks]
        if missing:
            raise FileNotFoundError(
                f"MADOS: {len(missing)} crops of {split_file.name} have no mask file, e.g. "
                f"{missing[:3]} (expected <root>/<Scene_n>/10/<Scene_n>_L2R_cl_<crop>.tif); is "
                "the dataset fully unzipped?"
            )
        band_files = self._band_files({masks[c].parent.parent for c in wanted})
        samples = []
        for crop in wanted:
            files = band_files.get(crop, {})
            absent = [b for b in self.bands if b not in files]
            if absent:
                details = ", ".join(
                    f"{b} ({MADOS_BANDS[b][1]}-{MADOS_BANDS[b][2]} nm in {MADOS_BANDS[b][0]}/)"
                    for b in absent
                )
                raise FileNotFoundError(
                    f"MADOS: crop {crop} has no file for band(s) {details}; expected "
                    f"<Scene_n>/<res>/<Scene_n>_L2R_rhorc_<nm>_<crop>.tif"
                )
            images = {b: files[b] for b in self.bands}
            samples.append(Sample(name=crop, mask=masks[crop], images=images))
        return samples

    @staticmethod
    def _band_files(scenes: set[Path]) -> dict[str, dict[str, Path]]:
        """crop id -> band -> file, for every band file of ``scenes``, matched by wavelength."""
        found: dict[str, dict[str, Path]] = {}
        for scene in scenes:
            for band, (res, low, high) in MADOS_BANDS.items():
                for path in (scene / res).glob("*_L2R_rhorc_*.tif"):
                    match = _BAND_FILE.match(path.name)
                    if match and low <= int(match.group(2)) <= high:
                        found.setdefault(f"{match.group(1)}_{match.group(3)}", {})[band] = path
        return found

    def read_image(self, sample: Sample) -> np.ndarray:
        """Every loaded band on the mask's 240×240 grid (coarser bands upsampled): (C, H, W)."""
        shape = raster_shape(sample.mask, georeferenced=False)  # the header only
        bands = []
        for band in self.bands:
            data = read_raster(sample.images[band], [1], georeferenced=False)[0]  # (h, w)
            if data.shape != shape:
                if shape[0] % data.shape[0] or shape[1] % data.shape[1]:
                    raise ValueError(
                        f"MADOS: {str(sample.images[band])!r} is {data.shape}, not a divisor "
                        f"of the mask's {shape}; the file does not belong to this crop"
                    )
                data = upsample_nearest(data, shape)
            bands.append(data.astype(np.float32))
        return np.stack(bands)  # (C, H, W)
