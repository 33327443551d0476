"""What a segmentation run's test split leaves: a GeoTIFF class map per tile and picture panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deflect.geotiff import NODATA_CLASS, write_prediction_geotiff
from deflect.pictures import rgb_composite, save_panels


class PredictionWriter:
    """Collects the first ``num_panels`` tiles for the PNG and writes every prediction as GeoTIFF.

    Args:
        dataset: the evaluated dataset (names, georeferencing, and its ``spec``: display bands,
            band statistics, classes).
        out_dir: the run's folder; GeoTIFFs go to ``out_dir/predictions/``.
        num_panels: tiles shown in the PNG (rank 0 only).
        write_geotiffs: also write each prediction as a GeoTIFF.
        is_main: whether this rank collects panels.
    """

    def __init__(
        self,
        dataset,
        out_dir: Path,
        num_panels: int,
        write_geotiffs: bool,
        is_main: bool,
    ) -> None:
        spec = dataset.spec
        self.dataset = dataset
        self.out_dir = out_dir
        self.rgb_index = spec.index_of(spec.display_bands, "the prediction pictures")
        self.mean = np.asarray(spec.mean_list(), dtype=np.float32)[self.rgb_index, None, None]
        self.std = np.asarray(spec.std_list(), dtype=np.float32)[self.rgb_index, None, None]
        self.num_panels = num_panels if is_main else 0
        self.write_geotiffs = write_geotiffs
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __call__(self, batch: dict, prediction: torch.Tensor, output=None) -> None:
        """Record one evaluated batch."""
        prediction = prediction.cpu().numpy().astype(np.uint8)
        # Where no band holds data there is nothing to predict: no-data, as scripts/predict.py.
        prediction[torch.isnan(batch["image"]).all(dim=1).numpy()] = NODATA_CLASS
        for j, index in enumerate(batch["index"].tolist()):
            if self.write_geotiffs:
                crs, transform = self.dataset.georeference(index)
                name = self.dataset.sample_name(index)
                write_prediction_geotiff(
                    prediction[j],
                    self.out_dir / "predictions" / f"{name}.tif",
                    crs,
                    transform,
                    self.dataset.classes,
                )
            if len(self.rows) < self.num_panels:
                image = batch["image"][j].numpy()[self.rgb_index] * self.std + self.mean
                shown = np.where(prediction[j] == NODATA_CLASS, self.dataset.ignore_index,
                                 prediction[j])  # fmt: skip
                self.rows.append((rgb_composite(image), batch["mask"][j].numpy(), shown))

    def finish(self, out_dir: Path) -> None:
        """Write the collected panels as ``test_predictions.png`` (rank 0)."""
        if self.num_panels:
            self.save_png(Path(out_dir) / "test_predictions.png")

    def save_png(self, path: Path) -> None:
        """Write the collected panels."""
        title = " / ".join(self.dataset.spec.display_bands)  # e.g. "B4 / B3 / B2"
        save_panels(self.rows, self.dataset.classes, self.dataset.ignore_index, path,
                    image_title=title)  # fmt: skip
