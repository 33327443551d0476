"""Class maps as GeoTIFFs that explain themselves: the source's georeference, a colour table in
the pictures' palette, band and file tags naming each value. Engine-neutral: evaluation's
predictions and ``scripts/predict.py``'s scenes are written alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from deflect.io import atomic_path
from deflect.pictures import PALETTE

#: Class-map value of pixels where every input band is invalid (evaluation's GeoTIFFs and
#: ``scripts/predict.py`` alike).
NODATA_CLASS = 255


def class_colours(num_classes: int) -> dict[int, tuple[int, int, int, int]]:
    """The colour table of a class map: class ``k`` in its colour in the pictures
    (:data:`PALETTE`, as :func:`colorize` draws it), :data:`NODATA_CLASS` transparent black."""
    colours = {k: (*(int(v) for v in PALETTE[k % len(PALETTE)]), 255) for k in range(num_classes)}
    colours[NODATA_CLASS] = (0, 0, 0, 0)
    return colours


def describe_classes(dst, class_names, band: int = 1) -> None:
    """Make band ``band`` of an open class-map GeoTIFF explain itself: its colour table
    (:func:`class_colours`), the description ``class``, one band tag per value naming its class
    (``0=bare``, ..., ``255=no data``, shown by ``gdalinfo`` and QGIS's metadata), and the
    ordered names in the file tag ``classes``. Call it before the pixels are written: GDAL
    changes a tiled file's photometric tag to palette only then (else it logs an error)."""
    names = [str(c) for c in class_names]
    dst.write_colormap(band, class_colours(len(names)))
    dst.set_band_description(band, "class")
    dst.update_tags(band, **{str(k): name for k, name in enumerate(names)},
                    **{str(NODATA_CLASS): "no data"})  # fmt: skip
    dst.update_tags(classes=",".join(names))


def describe_labels(dst, class_names) -> None:
    """A multi-label raster (one 0/1 band per label): each band named after its label, its
    values explained in band tags (``0=absent``, ``1=present``, ``255=no data``), the ordered
    names in the file tag ``classes``."""
    names = [str(c) for c in class_names]
    for k, name in enumerate(names):
        dst.set_band_description(k + 1, name)
        dst.update_tags(k + 1, **{"0": "absent", "1": "present", str(NODATA_CLASS): "no data"})
    dst.update_tags(classes=",".join(names))


def write_prediction_geotiff(
    prediction: np.ndarray, path: Path, crs, transform, class_names: list[str]
) -> None:
    """A single-band uint8 GeoTIFF of class indices with the source CRS and transform;
    :data:`NODATA_CLASS` (declared as its no-data value) where the input had no valid band."""
    profile = {
        "driver": "GTiff",
        "height": prediction.shape[0],
        "width": prediction.shape[1],
        "count": 1,
        "dtype": "uint8",
        "nodata": NODATA_CLASS,
        "compress": "deflate",
    }
    if crs is not None:
        profile["crs"] = crs
    if transform is not None and (crs is not None or transform != Affine.identity()):
        profile["transform"] = transform  # an identity without a CRS: a file with no georeference
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        describe_classes(dst, class_names)  # before the pixels: GDAL sets a palette only then
        dst.write(prediction.astype(np.uint8), 1)
