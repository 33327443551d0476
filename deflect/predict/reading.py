"""Reading scenes as the data pipeline reads training samples: a scene opened with its bands
matched to the model's (:func:`open_scene`), windows of it read in the trained units with
invalid pixels as NaN (:func:`read_valid`) and normalised with the run's statistics
(:func:`read_normalised`), and the check that its values are in the trained reflectance scale
(:func:`band_medians`, :func:`check_reflectance_scale`)."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from deflect import rasters
from deflect.data import DataSpec, invalid_to_nan
from deflect.predict.listing import select_bands
from deflect.rasters import implausible_reflectance, reflectance_factors

if TYPE_CHECKING:
    from deflect.predict.run import Predictor

log = logging.getLogger(__name__)

#: Side of the output GeoTIFFs' internal tiles.
OUTPUT_TILE = 256
#: The reflectance-scale check reads the scene decimated to at most this many pixels a side.
SCALE_CHECK_SIZE = 512


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
    factors = (
        reflectance_factors(
            spec.bands, spec.sensor, float(reflectance_scale), spec.reflectance_scale
        )  # fmt: skip
        if reflectance_scale
        else None
    )
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
) -> dict[str, float]:
    """Median of the valid pixels of each band, from the scene decimated to ``size`` a side
    (:func:`deflect.rasters.band_medians`, the rule the datasets use).

    Args:
        src: the open scene.
        indexes: 1-based band numbers, in the model's band order.
        spec: the model's data description (its bands and no-data value).
        size: at most this many pixels a side are read (default :data:`SCALE_CHECK_SIZE`).
        nodata: no-data values besides the training one (the scene's own declared value).

    Returns:
        The model's band -> its median in file units; bands without a valid pixel left out.
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
    return rasters.band_medians([image], spec.bands)


def check_reflectance_scale(
    medians: Mapping[str, float],
    spec: DataSpec,
    source: str,
    reflectance_scale: float | None = None,
) -> bool:
    """Warn when the scene's values are not plausible reflectance at its reflectance scale
    (:func:`deflect.rasters.implausible_reflectance`, the rule the datasets use): e.g. integer
    reflectance x10000 given to a model of float reflectance. A dark (water) or bright (snow)
    scene at the right scale is plausible, however far from the training means.

    Args:
        medians: the scene's band -> median, in the scene's own units (:func:`band_medians`).
        spec: the model's data description (its sensor and ``reflectance_scale``).
        source: the scene, for the message.
        reflectance_scale: the scene's stored value of reflectance 1.0 (``--reflectance-scale``);
            None: the model's.

    Returns:
        True when it warned.
    """
    scene_scale = float(reflectance_scale or spec.reflectance_scale)
    found = implausible_reflectance(medians, scene_scale, spec.sensor, "--reflectance-scale")
    if found is None:
        return False
    warnings.warn(
        f"{source} looks like another reflectance scale than the model was trained on: "
        f"{found[0]}; the model expects reflectance_scale={spec.reflectance_scale:g} (the "
        "stored value of reflectance 1.0). Rescale the scene to the training units or give its "
        "scale with --reflectance-scale, or predictions will be meaningless",
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
