"""GeoTIFF segmentation datasets: the base class every dataset builds on, and a folder layout.

A dataset reads its samples with rasterio and returns dicts with fixed keys::

    {"image": float32 tensor (C, H, W), "mask": int64 tensor (H, W), "index": int,
     "gsd": float32 scalar tensor (only when the ground sample distance is known)}

Invalid image pixels (NaN in the file, or the dataset's no-data value) are NaN in ``image``;
the model keeps them out of what it computes (see :mod:`deflect.data`).

Everything the model needs to know about the data is :attr:`GeoTIFFSegmentationDataset.spec`, a
:class:`~deflect.data.DataSpec` (bands, statistics, reflectance scale, no-data value, sensor,
GSD, classes, ignore index, display bands) validated once, where it is built.

A subclass only says where its files are and how they are laid out:

* ``available_bands``: band names in file (channel) order;
* :meth:`GeoTIFFSegmentationDataset.list_samples`: the :class:`Sample` records of one split;
* optionally :meth:`GeoTIFFSegmentationDataset.read_image` / ``read_mask`` when a sample is not
  one multi-band image file plus one single-band mask file (MADOS keeps one band per file);
* optionally the class defaults ``nodata``, ``sensor``, ``gsd``, ``label_offset`` (subtracted
  from the stored mask, e.g. 1 for MADOS where 0 means unlabelled) and ``georeferenced`` (False
  silences rasterio's ``NotGeoreferencedWarning`` for files that legitimately lack it).

Everything else (NaN and no-data handling, mapping out-of-range labels to ``ignore_index``,
georeferencing of predictions) lives here once.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import rasterio
import rasterio.warp
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from torch.utils.data import Dataset

from deflect.data import DataSpec, invalid_to_nan
from deflect.rasters import (  # noqa: F401 - seeded_split re-exported for the datasets
    band_medians,
    implausible_reflectance,
    reflectance_bands,
    reflectance_factors,
    seeded_split,
)

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One sample on disk.

    Args:
        name: a name unique within the split, used for prediction file names.
        mask: the label GeoTIFF (a class mask, or a regression dataset's target raster); its
            georeferencing is the sample's georeferencing.
        images: the image file(s), keyed as the dataset's ``read_image`` expects; the default
            reader expects a single multi-band file under ``"image"``.
    """

    name: str
    mask: Path
    images: dict[str, Path] = field(default_factory=dict)


@contextmanager
def _open_raster(path: Path, georeferenced: bool = True) -> Iterator[rasterio.DatasetReader]:
    """Open ``path`` with rasterio; errors name the file and what to do about it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GeoTIFF {str(path)!r} does not exist; check dataset.root and that the dataset is "
            "fully unpacked"
        )
    with warnings.catch_warnings():
        if not georeferenced:
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            src = rasterio.open(path)
        except RasterioError as err:
            raise OSError(
                f"cannot read GeoTIFF {str(path)!r} (corrupt or not a raster?): {err}; "
                "re-download or re-extract this file"
            ) from err
        with src:
            yield src


def read_raster(
    path: Path, indexes: list[int] | None = None, georeferenced: bool = True
) -> np.ndarray:
    """Read bands ``indexes`` (1-based, rasterio convention; all bands when None) of a GeoTIFF.

    Returns an array (C, H, W) in the file's dtype. A file rasterio cannot read raises an
    ``OSError`` naming the file.
    """
    with _open_raster(path, georeferenced) as src:
        return _read_bands(src, path, indexes)


def raster_shape(path: Path, georeferenced: bool = True) -> tuple[int, int]:
    """``(height, width)`` of a GeoTIFF, from its header (no pixels read)."""
    with _open_raster(path, georeferenced) as src:
        return src.height, src.width


def _read_bands(src: rasterio.DatasetReader, path: Path, indexes: list[int] | None) -> np.ndarray:
    if indexes is not None and max(indexes, default=0) > src.count:
        raise ValueError(
            f"GeoTIFF {str(path)!r} has {src.count} bands but band {max(indexes)} was "
            "requested; the file does not match the dataset's available_bands"
        )
    try:
        return src.read(indexes)  # (C, H, W)
    except RasterioError as err:
        raise OSError(
            f"cannot read pixels of GeoTIFF {str(path)!r} (truncated or corrupt?): {err}; "
            "re-download or re-extract this file"
        ) from err


class SpecView:
    """The data description's facts as dataset attributes, for any dataset with ``spec``."""

    spec: DataSpec

    @property
    def bands(self) -> list[str]:
        """Bands loaded, in channel order."""
        return list(self.spec.bands)

    @property
    def classes(self) -> list[str]:
        """Class names."""
        return list(self.spec.classes)

    @property
    def ignore_index(self) -> int:
        """Label of pixels (or images) without a class."""
        return self.spec.ignore_index

    @property
    def num_classes(self) -> int:
        """Number of classes (labels ``0 .. num_classes - 1``)."""
        return self.spec.num_classes


class ReflectanceCheck:
    """``check_reflectance_scale`` for any dataset with ``bands``, ``spec``, ``split``,
    ``len()`` and ``read_sample(i) -> (image in file units with NaN, target)``."""

    def check_reflectance_scale(self, samples: int = 8) -> dict[str, float]:
        """Check that ``reflectance_scale`` turns the files' values into plausible reflectance
        (the one rule, :func:`deflect.rasters.implausible_reflectance`, which prediction
        applies to scenes too).

        The median of the valid pixels of each reflectance band is taken over up to ``samples``
        samples spread over the split (:func:`deflect.rasters.band_medians`).

        Returns:
            The reflectance median per band checked (empty when no band is a reflectance band).

        Raises:
            ValueError: naming the bands, their medians, the likely scale and how to skip the
                check (``check_reflectance_scale=false``).
        """
        bands = reflectance_bands(self.bands, self.spec.sensor)
        if not bands:
            return {}
        index = [self.bands.index(b) for b in bands]
        picks = sorted({round(i * (len(self) - 1) / max(samples - 1, 1)) for i in range(samples)})
        images = (self.read_sample(i)[0][index] for i in picks[: len(self)])
        medians = band_medians(images, bands)
        scale = self.spec.reflectance_scale
        problem = implausible_reflectance(medians, scale, self.spec.sensor)
        if problem is not None:
            raise ValueError(
                f"{type(self).__name__} ({self.split}): {problem[0]}. If these bands are not "
                "reflectance (or the values are right), set check_reflectance_scale=false"
            )
        return {b: v / scale for b, v in medians.items()}


class GeoTIFFSegmentationDataset(SpecView, ReflectanceCheck, Dataset):
    """Base class of the segmentation datasets: GeoTIFF images and masks read with rasterio.

    All arguments are keyword-only plain types, as Hydra passes them from the dataset YAML;
    unknown keys are an error.

    Args:
        root: folder holding the dataset in its published layout.
        split: ``"train"``, ``"val"`` or ``"test"``.
        bands: bands to load, by name, in this order (a subset of ``available_bands``).
        classes: class names; mask values outside ``[0, len(classes))`` become ``ignore_index``.
        band_stats: ``{"mean": {band: float}, "std": {band: float}}`` covering ``bands``, in the
            units of the files (see ``reflectance_scale``).
        ignore_index: label of pixels that carry no class; must lie outside ``[0, num_classes)``.
        reflectance_scale: the file value of reflectance 1.0 (10000 for integer L2A products,
            1.0 for float reflectance). Images are returned in file units.
        nodata: the file value meaning "no data" (default: the dataset's own, often none).
        sensor: spyndex sensor of the bands (default: the dataset's own, ``sentinel2a``).
        gsd: ground sample distance in metres (default: the dataset's own).
        display_bands: red, green, blue bands of pictures (default B4, B3, B2 when loaded).
        transform: joint ``(image, mask) -> (image, mask)`` transform on tensors, normally a
            :class:`datasets.transforms.JointTransform` that also normalises; without one the
            image is returned raw. May also be set after construction.
        limited_label: train on this fraction of the training samples, a seeded random subset
            (the same on every run; at least one sample); ``None`` uses them all. Validation
            and test splits are never cut.
        limited_label_seed: the seed of that subset.
    """

    available_bands: ClassVar[list[str]] = []
    nodata: ClassVar[float | None] = None
    sensor: ClassVar[str] = "sentinel2a"
    gsd: ClassVar[float | None] = None
    label_offset: ClassVar[int] = 0
    georeferenced: ClassVar[bool] = True
    layout: ClassVar[str] = "see the dataset's docstring"
    #: The batch key of a sample's target: ``mask`` (classes), ``target`` (regression).
    target_key: ClassVar[str] = "mask"

    def __init__(
        self,
        *,
        root: str,
        split: str,
        bands: list[str],
        classes: list[str],
        band_stats: dict[str, dict[str, float]],
        ignore_index: int = -1,
        reflectance_scale: float = 1.0,
        nodata: float | None = None,
        sensor: str | None = None,
        gsd: float | None = None,
        display_bands: list[str] | None = None,
        transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
        | None = None,
        limited_label: float | None = None,
        limited_label_seed: int = 0,
    ) -> None:
        name = type(self).__name__
        if limited_label is not None and not 0 < limited_label <= 1:
            raise ValueError(
                f"{name}: limited_label={limited_label} must be a fraction in (0, 1] (or null)"
            )
        if split not in SPLITS:
            raise ValueError(f"{name}: split {split!r} is not one of {list(SPLITS)}")
        self.split = split
        bands = self._validated_bands(bands)
        stats = band_stats if hasattr(band_stats, "get") else {}
        for key in ("mean", "std"):
            if stats.get(key) is None:
                raise ValueError(
                    f"{name}: band_stats has no {key!r} table; give dataset.band_stats.{key} as "
                    f"{{band: value}} for bands {bands}"
                )
        classes = self._validated_classes(list(classes))
        try:
            self.spec = DataSpec(
                bands=tuple(bands),
                mean=stats["mean"],
                std=stats["std"],
                reflectance_scale=reflectance_scale,
                nodata=type(self).nodata if nodata is None else nodata,
                sensor=sensor or type(self).sensor,
                gsd=type(self).gsd if gsd is None else gsd,
                classes=tuple(classes),
                ignore_index=ignore_index,
                display_bands=None if display_bands is None else tuple(display_bands),
                **self._spec_extras(),
            )
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        self.transform = transform

        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{name}: dataset root {str(self.root)!r} does not exist; download the dataset "
                "there or set dataset.root=<path to the unpacked dataset>"
            )
        self.samples = self.list_samples(split)
        if not self.samples:
            raise ValueError(
                f"{name}: split {split!r} has no samples under {str(self.root)!r}; check that "
                f"dataset.root points at the unpacked dataset (expected layout: {self.layout})"
            )
        if split == "train" and limited_label is not None and limited_label < 1:
            keep = max(1, round(limited_label * len(self.samples)))
            order = np.random.default_rng(limited_label_seed).permutation(len(self.samples))
            self.samples = [self.samples[i] for i in sorted(order[:keep])]
            log.info(
                "%s: limited_label=%s keeps %d of the training samples", name, limited_label, keep
            )

    # ----------------------------------------------------------------------------- validation

    def _validated_classes(self, classes: list[str]) -> list[str]:
        """The class names; segmentation needs at least two."""
        if len(classes) < 2:
            raise ValueError(
                f"{type(self).__name__}: dataset.classes={classes} has {len(classes)} class(es); "
                "segmentation needs at least 2: list every class the masks hold, e.g. "
                "[background, <your class>]"
            )
        return classes

    def _spec_extras(self) -> dict[str, Any]:
        """More fields of the data description (a regression dataset's target names)."""
        return {}

    def _validated_bands(self, bands: list[str]) -> list[str]:
        name = type(self).__name__
        bands = list(bands)
        if not bands:
            raise ValueError(f"{name}: bands is empty; choose from {self.available_bands}")
        for band in bands:
            if band not in self.available_bands:
                raise ValueError(
                    f"{name}: band {band!r} is not available; available bands are "
                    f"{self.available_bands}; fix dataset.bands"
                )
        return bands

    # ---------------------------------------------------------------------- subclass hooks

    def list_samples(self, split: str) -> list[Sample]:
        """Return the samples of ``split`` (an empty list if there are none)."""
        raise NotImplementedError(f"{type(self).__name__} must implement list_samples(split)")

    def read_image(self, sample: Sample) -> np.ndarray:
        """Read the raw bands ``self.bands`` of ``sample`` in that order: (C, H, W).

        The default reads one multi-band GeoTIFF ``sample.images["image"]`` whose bands are
        ``available_bands`` in order. NaN and ``nodata`` handling happen in the caller.
        """
        path = sample.images["image"]
        with _open_raster(path, self.georeferenced) as src:
            if src.count != len(self.available_bands):
                raise ValueError(
                    f"GeoTIFF {str(path)!r} has {src.count} bands but {type(self).__name__} "
                    f"expects {len(self.available_bands)} ({self.available_bands}); the file is "
                    "not from this dataset or is damaged"
                )
            indexes = [self.available_bands.index(b) + 1 for b in self.bands]
            return _read_bands(src, path, indexes)  # (C, H, W)

    def read_mask(self, sample: Sample) -> np.ndarray:
        """Read the stored label of ``sample`` (first band of ``sample.mask``): (H, W)."""
        return read_raster(sample.mask, [1], self.georeferenced)[0]  # (H, W)

    # ---------------------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self.samples)

    def sample_name(self, index: int) -> str:
        """Name of sample ``index``, unique within the split."""
        return self.samples[index].name

    def georeference(self, index: int) -> tuple[CRS | None, Affine]:
        """CRS (None if the file has none) and affine transform of sample ``index``'s mask."""
        with _open_raster(self.samples[index].mask, self.georeferenced) as src:
            return src.crs, src.transform

    def read_sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw image (C, H, W) float32 with NaN at invalid pixels (non-finite or the no-data
        value), and mask (H, W) int64.

        Mask values outside ``[0, num_classes)`` after ``label_offset`` become ``ignore_index``,
        as do pixels where every band is invalid (nothing to classify: evaluation never scores
        them, and whole-scene prediction writes no-data there).
        """
        sample = self.samples[index]
        raw = np.asarray(self.read_image(sample))  # (C, H, W), the file's dtype
        image = invalid_to_nan(raw, self.spec.nodata)

        raw_mask = np.asarray(self.read_mask(sample))  # (H, W)
        if image.shape[1:] != raw_mask.shape:
            raise ValueError(
                f"{type(self).__name__}: sample {sample.name!r} has image {image.shape[1:]} but "
                f"mask {raw_mask.shape} ({str(sample.mask)!r}); image and mask must align"
            )
        if np.issubdtype(raw_mask.dtype, np.floating):
            finite = np.isfinite(raw_mask)
            raw_mask = np.where(finite, raw_mask, -1)
        mask = raw_mask.astype(np.int64) - self.label_offset  # (H, W)
        mask[(mask < 0) | (mask >= self.num_classes)] = self.ignore_index
        # A pixel without a single valid band carries no data to classify: it is not scored,
        # and scripts/predict.py writes no-data (255) there.
        mask[np.isnan(image).all(axis=0)] = self.ignore_index
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.read_sample(index)
        image_t = torch.from_numpy(image)  # (C, H, W)
        mask_t = torch.from_numpy(mask)  # (H, W)
        if self.transform is not None:
            image_t, mask_t = self.transform(image_t, mask_t)
        sample = {"image": image_t, "mask": mask_t, "index": index}
        sample.update(self.sample_metadata(index))
        return sample

    def sample_metadata(self, index: int) -> dict[str, torch.Tensor]:
        """Per-sample metadata, by the names encoders take them (``metadata_keys``): ``gsd``
        (metres, Scale-MAE); datasets that know them add ``temporal_coords`` (year, day of
        year) and ``location_coords`` (latitude, longitude; Prithvi-EO-2.0 TL)."""
        gsd = self.sample_gsd(index)
        return {} if gsd is None else {"gsd": torch.tensor(gsd, dtype=torch.float32)}

    def sample_gsd(self, index: int) -> float | None:
        """Ground sample distance of sample ``index`` in metres (default: the dataset's)."""
        return self.spec.gsd

    def centre_lat_lon(self, index: int) -> tuple[float, float] | None:
        """Latitude and longitude (degrees, WGS 84) of the centre of sample ``index``'s mask,
        or None when it is not georeferenced."""
        with _open_raster(self.samples[index].mask, self.georeferenced) as src:
            if src.crs is None:
                return None
            x, y = src.transform @ (src.width / 2, src.height / 2)
            lon, lat = rasterio.warp.transform(src.crs, "EPSG:4326", [x], [y])
        return float(lat[0]), float(lon[0])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"samples={len(self)}, bands={self.bands}, classes={self.num_classes})"
        )


class FolderSegmentation(GeoTIFFSegmentationDataset):
    """Image/mask GeoTIFF pairs in one folder per split.

    Layout::

        <root>/<split>/<name>_image.tif   multi-band image, bands = available_bands in order
        <root>/<split>/<name>_mask.tif    single-band class mask

    Use it directly for your own data by giving ``available_bands`` in the YAML, or subclass it
    with ``available_bands`` as a class attribute (the demo dataset does). Other arguments are
    those of :class:`GeoTIFFSegmentationDataset`.

    Args:
        available_bands: band names of the image files in order; defaults to the class attribute.
    """

    image_suffix: ClassVar[str] = "_image.tif"
    mask_suffix: ClassVar[str] = "_mask.tif"
    layout: ClassVar[str] = "<root>/<split>/<name>_image.tif + <name>_mask.tif"

    def __init__(self, *, available_bands: list[str] | None = None, **kwargs: Any) -> None:
        if available_bands is not None:
            self.available_bands = list(available_bands)
        if not self.available_bands:
            raise ValueError(
                f"{type(self).__name__}: available_bands is not set; give dataset."
                "available_bands as the image files' band names in order"
            )
        super().__init__(**kwargs)  # unknown keys fail there, naming the base's arguments

    def list_samples(self, split: str) -> list[Sample]:
        """Pairs ``<name>_mask.tif`` with ``<name>_image.tif`` in ``<root>/<split>``, by name."""
        folder = self.root / split
        samples = []
        for mask in sorted(folder.glob(f"*{self.mask_suffix}")):
            name = mask.name[: -len(self.mask_suffix)]
            image = folder / f"{name}{self.image_suffix}"
            if not image.is_file():
                raise FileNotFoundError(
                    f"{type(self).__name__}: mask {str(mask)!r} has no image {str(image)!r}; "
                    "restore the image or remove the mask"
                )
            samples.append(Sample(name=name, mask=mask, images={"image": image}))
        return samples


class BandMappedDataset(SpecView, Dataset):
    """Another sensor's dataset read as the bands a model was trained on (cross-sensor
    evaluation: ``run.py eval_dir=<run> dataset=<other sensor>``).

    Sample ``i`` is the wrapped dataset's, with its channels taken in the trained order
    (``given_bands[k]`` stands in for ``trained.bands[k]``, see :func:`deflect.data.map_bands`)
    and its reflectance bands converted to the trained reflectance scale; invalid pixels stay
    NaN. ``spec`` is the trained data description: the trained statistics normalise the values,
    since reflectance is a physical quantity the two sensors share.

    Args:
        dataset: the other sensor's dataset (a :class:`GeoTIFFSegmentationDataset`).
        given_bands: its band standing in for each trained band, in the trained order.
        trained: the band manifest of the trained run.
    """

    def __init__(self, dataset: GeoTIFFSegmentationDataset, given_bands: list[str],
                 trained: DataSpec) -> None:  # fmt: skip
        self.dataset = dataset
        self.spec = trained
        self.index = [dataset.bands.index(b) for b in given_bands]
        factors = reflectance_factors(trained.bands, trained.sensor,
                                      dataset.spec.reflectance_scale, trained.reflectance_scale)  # fmt: skip
        self.factors = (
            np.ones((len(trained.bands), 1, 1), np.float32) if factors is None else factors
        )
        self.transform = None

    def __len__(self) -> int:
        return len(self.dataset)

    def read_sample(self, index: int) -> tuple[np.ndarray, Any]:
        """The trained bands (C, H, W) in trained units, NaN where invalid, and the target (a
        mask's ignored pixels, or an image's missing class, marked with the trained
        ``ignore_index``; a multi-hot label set or a regression target as it is)."""
        image, target = self.dataset.read_sample(index)
        if getattr(self.dataset, "target_key", "mask") == "mask" and not getattr(
            self.dataset, "multi_label", False
        ):
            target = np.where(np.asarray(target) == self.dataset.ignore_index,
                              self.spec.ignore_index, target)  # fmt: skip
        return image[self.index] * self.factors, target

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, target = self.read_sample(index)
        if hasattr(self.dataset, "label_tensor"):  # an image-level dataset
            key, target_t = "label", self.dataset.label_tensor(target)
        else:  # a pixel-wise dataset: its mask or its target raster
            key, target_t = self.dataset.target_key, torch.from_numpy(target)
        image_t = torch.from_numpy(image)
        if self.transform is not None:
            image_t, target_t = self.transform(image_t, target_t)
        metadata = getattr(self.dataset, "sample_metadata", lambda i: {})(index)
        return {"image": image_t, key: target_t, "index": index, **metadata}

    def sample_name(self, index: int) -> str:
        return self.dataset.sample_name(index)

    def georeference(self, index: int) -> tuple[CRS | None, Affine]:
        return self.dataset.georeference(index)
