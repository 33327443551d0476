"""Sen1Floods11 (Bonafilia et al., CVPR Workshops 2020), hand-labelled subset v1.1, read from
its release.

Copy the ``v1.1`` folder of the ``sen1floods11`` bucket (the hand-labelled part is small) and
point ``dataset.root`` at the folder holding it::

    <root>/v1.1/splits/flood_handlabeled/flood_{train,valid,test}_data.csv
        no header; "<Event>_<id>_S1Hand.tif,<Event>_<id>_LabelHand.tif" per line
    <root>/v1.1/data/flood_events/HandLabeled/S2Hand/<Event>_<id>_S2Hand.tif   13 bands, L1C x10000
    <root>/v1.1/data/flood_events/HandLabeled/S1Hand/<Event>_<id>_S1Hand.tif   VV, VH in dB
    <root>/v1.1/data/flood_events/HandLabeled/LabelHand/<Event>_<id>_LabelHand.tif
        -1 no data (ignored), 0 not water, 1 water

Optical and SAR are separate modalities (``modality: optical`` or ``sar``): their units and
statistics differ, and spectral indices apply to reflectance only.
"""

from __future__ import annotations

from typing import Any, ClassVar

from datasets.base import GeoTIFFSegmentationDataset, Sample

OPTICAL_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
SAR_BANDS = ["VV", "VH"]
SPLIT_FILES = {"train": "flood_train_data.csv", "val": "flood_valid_data.csv",
               "test": "flood_test_data.csv"}  # fmt: skip
HAND = "v1.1/data/flood_events/HandLabeled"


class Sen1Floods11(GeoTIFFSegmentationDataset):
    """Sen1Floods11 hand-labelled chips in the released layout (see the module docstring).

    Args:
        modality: ``optical`` (S2Hand, 13 bands) or ``sar`` (S1Hand, VV and VH).
        **kwargs: those of :class:`~datasets.base.GeoTIFFSegmentationDataset`.
    """

    available_bands: ClassVar[list[str]] = OPTICAL_BANDS
    sensor: ClassVar[str] = "sentinel2a"
    gsd: ClassVar[float | None] = 10.0
    layout: ClassVar[str] = (
        "<root>/v1.1/splits/flood_handlabeled/flood_<split>_data.csv and "
        f"<root>/{HAND}/{{S2Hand,S1Hand,LabelHand}}/<Event>_<id>_<kind>.tif"
    )

    def __init__(self, *, modality: str = "optical", **kwargs: Any) -> None:
        if modality not in ("optical", "sar"):
            raise ValueError(
                f"Sen1Floods11: modality={modality!r}; use optical (S2Hand) or sar (S1Hand)"
            )
        self.modality = modality
        self.available_bands = OPTICAL_BANDS if modality == "optical" else SAR_BANDS
        super().__init__(**kwargs)

    def list_samples(self, split: str) -> list[Sample]:
        """Chips listed in the split's CSV file, with their image of this modality."""
        csv = self.root / "v1.1" / "splits" / "flood_handlabeled" / SPLIT_FILES[split]
        if not csv.is_file():
            raise FileNotFoundError(
                f"Sen1Floods11: split file {str(csv)!r} does not exist; dataset.root must hold "
                "v1.1/ (splits/ and data/flood_events/HandLabeled/)"
            )
        kind = "S2Hand" if self.modality == "optical" else "S1Hand"
        samples = []
        for line in csv.read_text().splitlines():
            if not line.strip():
                continue
            first = line.split(",")[0].strip()
            if not first.endswith("_S1Hand.tif"):
                raise ValueError(
                    f"Sen1Floods11: {csv.name} line {line!r} does not start with "
                    "<Event>_<id>_S1Hand.tif; is this the hand-labelled split file?"
                )
            chip = first[: -len("_S1Hand.tif")]
            image = self.root / HAND / kind / f"{chip}_{kind}.tif"
            mask = self.root / HAND / "LabelHand" / f"{chip}_LabelHand.tif"
            for path in (image, mask):
                if not path.is_file():
                    raise FileNotFoundError(
                        f"Sen1Floods11: chip {chip} of {csv.name} has no {str(path)!r}; is the "
                        "hand-labelled data fully copied?"
                    )
            samples.append(Sample(name=chip, mask=mask, images={"image": image}))
        return samples
