"""Reading scenes as the data pipeline reads training samples: a scene opened with its bands
matched to the model's (:func:`open_scene`), windows of it read in the trained units with
invalid pixels as NaN (:func:`read_valid`) and normalised with the run's statistics
(:func:`read_normalised`), and the check that its values are in the trained reflectance scale
(:func:`band_medians`, :func:`check_reflectance_scale`)."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from deflect.data import DataSpec, invalid_to_nan, reflectance_bands
from deflect.predict.listing import select_bands

if TYPE_CHECKING:
    from deflect.predict.run import Predictor

log = logging.getLogger(__name__)

#: Side of the output GeoTIFFs' internal tiles.
OUTPUT_TILE = 256
#: The reflectance-scale check reads the scene decimated to at most this many pixels a side.
SCALE_CHECK_SIZE = 512
#: Scene medians further than this factor from the training means look like another scale.
SCALE_CHECK_FACTOR = 20.0


@dataclass(frozen=True)
class SceneInput:
    """An open scene (or chip) and how its bands become the model's.

    Args:
        src: the open file.
        indexes: its band numbers (1-based) holding the model's bands, in the model's order.
        nodata: its own declared no-data value (besides the training one), or nothing.
        factors: ``(C, 1, 1)`` factors to the trained reflectance scale, or None.
    """

    src: rasterio.DatasetReader
    indexes: list[int]
    nodata: tuple[float, ...]
    factors: np.ndarray | None


def open_scene(
    predictor: Predictor,
    path: Path,
    bands: Sequence[str] | None = None,
    sensor: str | None = None,
    reflectance_scale: float | None = None,
    what: str = "scene",
) -> SceneInput:
    """Open a GeoTIFF and match its bands, no-data value and units to the model's
    (:func:`select_bands`); the caller closes ``src``.

    Raises:
        FileNotFoundError: the file does not exist.
        OSError: it cannot be opened.
        ValueError: it lacks bands the model needs.
    """
    spec = predictor.spec
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    except RasterioError as err:
        raise OSError(f"cannot open {what} {str(path)!r} (not a GeoTIFF?): {err}") from err
    try:
        indexes = select_bands(src.count, src.descriptions, spec, bands, f"{what} {str(path)!r}",
                               sensor)  # fmt: skip
    except BaseException:
        src.close()
        raise
    factors = None
    if reflectance_scale and float(reflectance_scale) != spec.reflectance_scale:
        optical = set(reflectance_bands(spec.bands, spec.sensor))
        factor = spec.reflectance_scale / float(reflectance_scale)
        factors = np.array([factor if b in optical else 1.0 for b in spec.bands],
                           dtype=np.float32)[:, None, None]  # fmt: skip
    # The file's own no-data value is honoured too, as training honours its files' value.
    nodata = () if src.nodata is None or np.isnan(src.nodata) else (float(src.nodata),)
    if nodata and spec.nodata != nodata[0] and what == "scene":
        log.info("%s declares no-data %g (training used %s): those pixels are left out",
                 path.name, nodata[0], spec.nodata)  # fmt: skip
    return SceneInput(src, indexes, nodata, factors)


def read_valid(
    src: rasterio.DatasetReader,
    indexes: list[int],
    window: Window | None,
    spec: DataSpec,
    nodata: Sequence[float] = (),
    factors: np.ndarray | None = None,
) -> np.ndarray:
    """Bands ``indexes`` of ``window`` of ``src`` in the trained units, invalid pixels NaN: what
    a dataset's ``read_sample`` gives training and evaluation.

    Args:
        src: the open scene.
        indexes: 1-based band numbers, in the model's band order.
        window: the pixels to read (inside the scene); None for all of them.
        spec: the model's data description (its no-data value).
        nodata: no-data values besides the training one (the scene's own declared value).
        factors: ``(C, 1, 1)`` per-band factors to the trained units (another reflectance scale).

    Returns:
        float32 ``(C, height, width)``, NaN at invalid pixels.

    Raises:
        OSError: the pixels cannot be read.
    """
    try:
        raw = src.read(indexes, window=window)
    except RasterioError as err:
        where = f"pixels {window} of " if window is not None else "pixels of "
        raise OSError(f"cannot read {where}{src.name!r} (truncated or corrupt?): {err}") from err
    image = invalid_to_nan(raw, [v for v in (spec.nodata, *nodata) if v is not None])
    if factors is not None:  # another reflectance scale than training's
        image = image * factors
    return image


def read_normalised(
    src: rasterio.DatasetReader,
    indexes: list[int],
    window: Window,
    spec: DataSpec,
    nodata: Sequence[float] = (),
    factors: np.ndarray | None = None,
    normalise: bool = True,
) -> np.ndarray:
    """:func:`read_valid`, normalised per band: ``(x - mean) / std`` with the run's statistics,
    as the segmentation pipeline normalises (``datasets/transforms.py`` ``JointTransform``).
    ``normalise=False`` leaves the values in the trained units, for a model that normalises
    inside (an exported ONNX file, :mod:`deflect.export.runtime`)."""
    image = read_valid(src, indexes, window, spec, nodata, factors)
    if not normalise:
        return image
    mean = np.asarray(spec.mean_list(), dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std_list(), dtype=np.float32)[:, None, None]
    return (image - mean) / std


def band_medians(
    src: rasterio.DatasetReader,
    indexes: list[int],
    spec: DataSpec,
    size: int | None = None,
    nodata: Sequence[float] = (),
) -> list[float]:
    """Median of the valid pixels of each band, from the scene decimated to ``size`` a side.

    Args:
        src: the open scene.
        indexes: 1-based band numbers, in the model's band order.
        spec: the model's data description (its no-data value).
        size: at most this many pixels a side are read (default :data:`SCALE_CHECK_SIZE`).

    Returns:
        One median per band, in file units (NaN for a band without valid pixels).
    """
    size = SCALE_CHECK_SIZE if size is None else size
    step = max(1, math.ceil(max(src.height, src.width) / size))
    shape = (len(indexes), max(1, src.height // step), max(1, src.width // step))
    try:
        raw = src.read(indexes, out_shape=shape, resampling=Resampling.nearest)
    except RasterioError as err:
        raise OSError(
            f"cannot read pixels of {src.name!r} (truncated or corrupt?): {err}; re-download "
            "or re-export this scene"
        ) from err
    image = invalid_to_nan(raw, [v for v in (spec.nodata, *nodata) if v is not None])
    out = []
    for band in image:
        valid = band[np.isfinite(band)]
        out.append(float(np.median(valid)) if valid.size else float("nan"))
    return out


def check_reflectance_scale(medians: Sequence[float], spec: DataSpec, source: str) -> bool:
    """Warn when the scene's values look like another reflectance scale than training's.

    A band is off when its median and its training mean (both positive) differ by more than
    :data:`SCALE_CHECK_FACTOR`; the warning is given when most bands are off, e.g. a scene of
    integer reflectance x10000 for a model trained on float reflectance.

    Args:
        medians: the scene's median per band, in the model's band order.
        spec: the model's data description (band means, ``reflectance_scale``).
        source: the scene, for the message.

    Returns:
        True when it warned.
    """
    means = spec.mean_list()
    usable = [
        (b, m, mean)
        for b, m, mean in zip(spec.bands, medians, means)
        if math.isfinite(m) and m > 0 and mean > 0
    ]
    off = [(b, m, mean) for b, m, mean in usable if max(m / mean, mean / m) > SCALE_CHECK_FACTOR]
    if not off or len(off) * 2 <= len(usable):
        return False
    ratio = float(np.median([m / mean for _, m, mean in off]))
    warnings.warn(
        f"{source} looks like another reflectance scale than the model was trained on: bands "
        f"{[b for b, _, _ in off]} have scene medians {[round(m, 4) for _, m, _ in off]} but "
        f"training means {[round(mean, 4) for _, _, mean in off]} (about x{ratio:.3g}); the "
        f"model expects reflectance_scale={spec.reflectance_scale:g} (the stored value of "
        "reflectance 1.0). Rescale the scene to the training units, or predictions will be "
        "meaningless",
        UserWarning,
        stacklevel=2,
    )
    return True


def scene_profile(src: rasterio.DatasetReader, count: int, dtype: str, nodata: float) -> dict:
    """The profile of an output GeoTIFF over ``src``: its size, CRS and transform, ``count``
    bands of ``dtype`` with ``nodata``, tiled and deflate-compressed."""
    profile = {
        "driver": "GTiff",
        "height": src.height,
        "width": src.width,
        "count": count,
        "dtype": dtype,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": OUTPUT_TILE,
        "blockysize": OUTPUT_TILE,
        "compress": "deflate",
        "bigtiff": "IF_SAFER",
    }
    if src.crs is not None:
        profile["crs"] = src.crs
    if src.crs is not None or src.transform != Affine.identity():
        profile["transform"] = src.transform  # an identity without a CRS: no georeference
    return profile
