"""DemoVegetation: a small real dataset built from the Sentinel-2 sample that ships with spyndex.

``spyndex.datasets.open("sentinel")`` holds a real Sentinel-2 L2A crop: bands B02, B03, B04, B08
(10 m) over 300×300 pixels, integer reflectance ×10000, without labels or georeferencing. The
demo labels each pixel by its NDVI = (B8 − B4) / (B8 + B4)::

    0 bare      NDVI < 0.2
    1 sparse    0.2 <= NDVI < 0.4
    2 moderate  0.4 <= NDVI < 0.6
    3 dense     NDVI >= 0.6

and splits the scene into non-overlapping horizontal strips (rows; all 300 columns)::

    train  rows   0-171   64×64 tiles, stride 32, plus a last row/column of tiles aligned to the
                          strip's bottom/right edge: 5 × 9 = 45 tiles (overlapping, within train)
    val    rows 172-235   64×64 tiles at columns 0, 64, 128, 192 and 236: 5 tiles
    test   rows 236-299   same columns: 5 tiles

300 columns are not a multiple of 64, so the right-aligned val/test tile (columns 236-299) shares
columns 236-255 with its neighbour. Those 20 × 64 shared pixels are labelled
``DEMO_NOT_EVALUATED`` (255, read as ``ignore_index``) in the right-aligned tile, so every pixel
of the val and test strips is scored exactly once. No pixel belongs to tiles of two splits.

The array axes of the spyndex sample are taken as (band, row, column), in the order stored
(spyndex names them ``x``, ``y``). The tiles are written once by :func:`prepare_demo` as real
GeoTIFFs and then read back by :class:`~datasets.base.FolderSegmentation`, the same rasterio path
as any real dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import rasterio
import spyndex
from affine import Affine
from rasterio.crs import CRS

from datasets.base import FolderSegmentation
from datasets.folder import GeoTIFFFolderRegression

DEMO_BANDS = ["B2", "B3", "B4", "B8"]
DEMO_CLASSES = ["bare", "sparse", "moderate", "dense"]
DEMO_NDVI_THRESHOLDS = (0.2, 0.4, 0.6)
DEMO_NOT_EVALUATED = 255
DEMO_TILE_SIZE = 64
DEMO_TRAIN_STRIDE = 32
DEMO_SCENE_SIZE = 300
# Rows [start, stop) of each split's strip.
DEMO_REGIONS = {"train": (0, 172), "val": (172, 236), "test": (236, 300)}
# Placeholder georeferencing (the spyndex sample has none): a UTM 31N CRS and a 10 m grid whose
# origin is arbitrary. It only makes the tiles georeferenced consistently with each other.
DEMO_CRS = "EPSG:32631"
DEMO_PIXEL_SIZE = 10.0
DEMO_SCENE_ORIGIN = (500000.0, 5000000.0)  # (x, y) of the scene's top-left corner, metres
# Per-band mean and std (population) of the train strip (rows 0-171, all columns), in
# reflectance ×10000 units; copy these into the dataset YAML.
DEMO_BAND_STATS = {
    "mean": {"B2": 465.2907, "B3": 673.4912, "B4": 762.2167, "B8": 2272.6192},
    "std": {"B2": 183.1734, "B3": 221.0933, "B4": 441.8651, "B8": 401.6916},
}
DEMO_REFLECTANCE_SCALE = 10000.0
_MANIFEST = "manifest.json"
_FORMAT_VERSION = 1
#: The regression demo: its input bands (RGB only) and its target, a spectral index of them.
DEMO_RGB_BANDS = ["B2", "B3", "B4"]
DEMO_INDEX = "GLI"
#: The label files of each demo form: the segmentation demo's masks, the regression demo's
#: target rasters (``dataset=folder``'s default patterns of each form).
_LABEL_SUFFIX = {"segmentation": "_mask.tif", "regression": "_target.tif"}
_SPYNDEX_BANDS = {"B2": "B02", "B3": "B03", "B4": "B04", "B8": "B08"}


def demo_scene() -> np.ndarray:
    """The spyndex Sentinel-2 sample as int64 reflectance ×10000, bands ``DEMO_BANDS``: (4, 300, 300)."""
    data = spyndex.datasets.open("sentinel")
    return np.stack([data.sel(band=_SPYNDEX_BANDS[b]).values for b in DEMO_BANDS]).astype(np.int64)


def demo_labels(scene: np.ndarray) -> np.ndarray:
    """Class of every pixel of ``scene`` (bands ``DEMO_BANDS``) by NDVI thresholds: (H, W) uint8."""
    red, nir = scene[2].astype(np.float64), scene[3].astype(np.float64)
    ndvi = spyndex.computeIndex("NDVI", params={"N": nir, "R": red})  # (H, W)
    return np.digitize(ndvi, DEMO_NDVI_THRESHOLDS).astype(np.uint8)


def _starts(start: int, stop: int, size: int, stride: int) -> list[int]:
    """Tile offsets with ``stride`` inside [start, stop), plus one aligned to ``stop``."""
    starts = list(range(start, stop - size + 1, stride))
    if starts[-1] + size < stop:
        starts.append(stop - size)
    return starts


def demo_tiles(split: str) -> list[tuple[int, int]]:
    """(row, column) of the top-left pixel of every tile of ``split``, in scene pixels."""
    start, stop = DEMO_REGIONS[split]
    stride = DEMO_TRAIN_STRIDE if split == "train" else DEMO_TILE_SIZE
    rows = _starts(start, stop, DEMO_TILE_SIZE, stride)
    cols = _starts(0, DEMO_SCENE_SIZE, DEMO_TILE_SIZE, stride)
    return [(r, c) for r in rows for c in cols]


def demo_tile_id(row: int, col: int) -> str:
    """Name of the tile whose top-left pixel is (``row``, ``col``) in the scene."""
    return f"r{row:03d}_c{col:03d}"


def demo_tile_transform(row: int, col: int) -> Affine:
    """Placeholder affine transform of the tile at (``row``, ``col``): its true scene offset."""
    x0, y0 = DEMO_SCENE_ORIGIN
    # Built directly: rasterio's from_origin composes with the deprecated Affine `*`.
    return Affine(
        DEMO_PIXEL_SIZE,
        0.0,
        x0 + col * DEMO_PIXEL_SIZE,
        0.0,
        -DEMO_PIXEL_SIZE,
        y0 - row * DEMO_PIXEL_SIZE,
    )


def demo_index(scene: np.ndarray) -> np.ndarray:
    """The regression demo's target, :data:`DEMO_INDEX` (GLI, the green leaf index
    (2G - R - B) / (2G + R + B)) of every pixel of ``scene`` (bands ``DEMO_BANDS``, reflectance
    x10000), computed by spyndex from reflectance: (H, W) float32."""
    blue, green, red = (scene[DEMO_BANDS.index(b)] / DEMO_REFLECTANCE_SCALE for b in DEMO_RGB_BANDS)
    params = {"B": blue, "G": green, "R": red}
    return np.asarray(spyndex.computeIndex(DEMO_INDEX, params=params), dtype=np.float32)


def _cache_is_complete(root: Path, kind: str = "segmentation") -> bool:
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format") != _FORMAT_VERSION or manifest.get("kind", "segmentation") != kind:
        return False
    return all(
        (root / split / f"{tile}{suffix}").is_file()
        for split, tiles in manifest.get("splits", {}).items()
        for tile in tiles
        for suffix in ("_image.tif", _LABEL_SUFFIX[kind])
    )


def _write_tiles(folder: Path, kind: str = "segmentation") -> dict[str, list[str]]:
    """Write every tile of every split under ``folder``: the segmentation demo's four bands and
    class masks, or the regression demo's RGB bands and :func:`demo_index` target rasters (NaN
    where the segmentation demo's masks say ``DEMO_NOT_EVALUATED``)."""
    scene = demo_scene()  # (4, 300, 300)
    labels = demo_labels(scene)  # (300, 300)
    index = demo_index(scene) if kind == "regression" else None  # (300, 300)
    bands = DEMO_RGB_BANDS if kind == "regression" else DEMO_BANDS
    channels = [DEMO_BANDS.index(b) for b in bands]
    crs = CRS.from_string(DEMO_CRS)
    size = DEMO_TILE_SIZE
    splits: dict[str, list[str]] = {}
    for split in DEMO_REGIONS:
        (folder / split).mkdir()
        covered = np.zeros(labels.shape, dtype=bool)  # (300, 300)
        splits[split] = []
        for row, col in demo_tiles(split):
            tile = demo_tile_id(row, col)
            window = (slice(row, row + size), slice(col, col + size))
            mask = labels[window].copy()  # (64, 64)
            if split != "train":
                # Pixels already in an earlier tile of this split are scored there only.
                mask[covered[window]] = DEMO_NOT_EVALUATED
                covered[window] = True
            profile = {
                "driver": "GTiff",
                "height": size,
                "width": size,
                "crs": crs,
                "transform": demo_tile_transform(row, col),
            }
            with rasterio.open(
                folder / split / f"{tile}_image.tif", "w", count=len(bands), dtype="uint16",
                **profile,
            ) as dst:  # fmt: skip
                dst.write(scene[(channels, *window)].astype(np.uint16))
                dst.descriptions = tuple(bands)
            label = folder / split / f"{tile}{_LABEL_SUFFIX[kind]}"
            if kind == "regression":
                target = np.where(mask == DEMO_NOT_EVALUATED, np.nan, index[window])
                with rasterio.open(label, "w", count=1, dtype="float32", nodata=np.nan,
                                   **profile) as dst:  # fmt: skip
                    dst.write(target[None].astype(np.float32))
                    dst.descriptions = (DEMO_INDEX,)
            else:
                with rasterio.open(label, "w", count=1, dtype="uint8", **profile) as dst:
                    dst.write(mask[None])
            splits[split].append(tile)
    return splits


def prepare_demo(root: str, kind: str = "segmentation") -> Path:
    """Write the demo tiles under ``root`` once, atomically; reuse a complete cache.

    ``kind``: ``segmentation`` (the vegetation classes) or ``regression`` (RGB tiles and their
    :data:`DEMO_INDEX` target rasters); each form has its own folder.

    The tiles are written to a temporary folder next to ``root``, with ``manifest.json`` last,
    and the folder is renamed to ``root``. Several processes (DDP ranks) may call this at once:
    the first rename wins and the others discard their copy. Returns ``root`` as a Path.
    """
    root = Path(root).expanduser()
    if _cache_is_complete(root, kind):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"demo cache {str(root)!r} exists but is not a complete demo cache (no valid "
            f"{_MANIFEST}); delete it or set dataset.root to another folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        splits = _write_tiles(tmp) if kind == "segmentation" else _write_tiles(tmp, kind)
        manifest = {
            "format": _FORMAT_VERSION,
            "source": 'spyndex.datasets.open("sentinel")',
            "bands": DEMO_BANDS,
            "classes": DEMO_CLASSES,
            "crs": DEMO_CRS + " (placeholder)",
            "splits": splits,
        }
        if kind == "regression":
            manifest.update(kind=kind, bands=DEMO_RGB_BANDS, targets=[DEMO_INDEX])
            del manifest["classes"]
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            # Replaces an empty folder; fails if another process has already put its copy there.
            os.rename(tmp, root)
        except OSError:
            if not _cache_is_complete(root, kind):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class DemoVegetation(FolderSegmentation):
    """The built-in demo: NDVI vegetation classes on the spyndex Sentinel-2 sample.

    See the module docstring for labels and splits. The GeoTIFFs are written to ``root`` on first
    use (``root`` need not exist) and read back like any folder dataset. Their CRS (EPSG:32631)
    and origin are placeholders: the source sample is not georeferenced; only the 10 m pixel
    size and the tiles' relative positions are real.

    Arguments are those of :class:`~datasets.base.GeoTIFFSegmentationDataset`, with the demo's
    own values as defaults (all four bands, its four classes, ``DEMO_BAND_STATS``,
    ``reflectance_scale=10000``).
    """

    available_bands = DEMO_BANDS
    gsd = DEMO_PIXEL_SIZE

    def __init__(
        self,
        *,
        root: str,
        split: str,
        bands: list[str] | None = None,
        classes: list[str] | None = None,
        band_stats: dict[str, dict[str, float]] | None = None,
        reflectance_scale: float = DEMO_REFLECTANCE_SCALE,
        **kwargs,
    ) -> None:
        classes = list(DEMO_CLASSES if classes is None else classes)
        if len(classes) != len(DEMO_CLASSES):
            raise ValueError(
                f"DemoVegetation: classes {classes} must name the demo's {len(DEMO_CLASSES)} "
                f"classes; set dataset.classes={DEMO_CLASSES}"
            )
        prepare_demo(root)
        super().__init__(
            root=root,
            split=split,
            bands=list(DEMO_BANDS if bands is None else bands),
            classes=classes,
            band_stats=DEMO_BAND_STATS if band_stats is None else band_stats,
            reflectance_scale=reflectance_scale,
            **kwargs,
        )


class DemoIndexRegression(GeoTIFFFolderRegression):
    """The regression demo: the green leaf index (GLI) of the spyndex Sentinel-2 sample,
    predicted from its RGB bands only, so the answer is known exactly.

    The same tiles and splits as :class:`DemoVegetation` (the module docstring), written once
    under ``root`` in ``dataset=folder``'s regression layout (``<split>/<tile>_image.tif``: B2,
    B3, B4 as reflectance x10000; ``<split>/<tile>_target.tif``: GLI, float32, NaN where the
    val/test tiles overlap, so each pixel is scored once) and read by
    :class:`~datasets.folder.GeoTIFFFolderRegression`, the loader of a user's own targets.

    Arguments are those of :class:`~datasets.folder.GeoTIFFFolderRegression`, with the demo's
    own values as defaults (the RGB bands' ``DEMO_BAND_STATS``, ``reflectance_scale=10000``).
    """

    gsd = DEMO_PIXEL_SIZE

    def __init__(self, *, root: str, split: str,
                 band_stats: dict[str, dict[str, float]] | None = None,
                 reflectance_scale: float = DEMO_REFLECTANCE_SCALE, **kwargs) -> None:  # fmt: skip
        prepare_demo(root, kind="regression")
        if band_stats is None:
            band_stats = {k: {b: v[b] for b in DEMO_RGB_BANDS} for k, v in DEMO_BAND_STATS.items()}
        super().__init__(root=root, split=split, band_stats=band_stats,
                         reflectance_scale=reflectance_scale, **kwargs)  # fmt: skip
