"""Your own GeoTIFFs: multi-band images and single-band masks, paired by file-name patterns.

Two patterns, relative to ``root``, say where images and masks are; ``{name}`` is the part they
share, ``{split}`` (optional) a folder per split::

    images: "{split}/{name}_image.tif"   masks: "{split}/{name}_mask.tif"   # the default
    images: "images/{name}.tif"          masks: "labels/{name}.tif"          # separate folders
    images: "*_B.tif"                    masks: "*_L.tif"                    # one folder

(a single ``*`` stands for ``{name}``: on the command line ``dataset.images=images/*.tif`` needs
no quoting).

Without ``{split}``, the splits come from ``split_files`` (one name per line, relative to
``root``) when given, else from a seeded split of every pair (``val_fraction``,
``test_fraction``, ``split_seed``): the same files on every run and every machine.

Band names come from ``available_bands`` or, when it is null, from the GeoTIFF band
descriptions. Per-band statistics come from ``band_stats`` or, when it is null, are computed
over the training images (valid pixels only) and cached in ``<root>/band_stats.json`` with the
size and modification time of every file they came from; they are recomputed when those change
(``scripts/compute_stats.py`` does the same up front and prints them for the config). Those
conventions are the raster-folder layer (:mod:`datasets.raster_folder`), shared with the
own-chips dataset.

For pixel-wise regression (``dataset=folder_regression``, :class:`GeoTIFFFolderRegression`) a
float *target raster* per image takes the mask's place::

    images: "{split}/{name}_image.tif"   targets: "{split}/{name}_target.tif"

one band per target (names from ``target_names`` or the band descriptions), its own no-data
value (``target_nodata``, else the files' tag; NaN always), ``target = stored x target_scale``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from datasets.base import GeoTIFFSegmentationDataset, Sample, read_raster
from datasets.raster_folder import (  # noqa: F401 - re-exported: the folder's public names
    STATS_FILE,
    STATS_VERSION,
    BandNames,
    FileHeader,
    cached_band_stats,
    compute_band_stats,
    content_fingerprint,
    declared_nodata,
    file_header,
    file_record,
    header_band_names,
    log_once,
    read_named_bands,
    resolve_bands,
)
from deflect.data import band_code, invalid_to_nan
from deflect.rasters import seeded_split

log = logging.getLogger(__name__)


def _pattern_regex(template: str) -> re.Pattern:
    """``"{split}/{name}_image.tif"`` (with split filled in) -> a regex capturing ``name``."""
    parts = re.split(r"(\{name\})", template)
    return re.compile(
        "".join("(?P<name>.+?)" if p == "{name}" else re.escape(p) for p in parts) + "$"
    )


def _with_name(template: str, key: str) -> str:
    """A pattern with ``{name}``; a single ``*`` stands for it too (handy on the command line,
    where Hydra needs braces quoted)."""
    if "{name}" not in template and template.count("*") == 1:
        template = template.replace("*", "{name}")
    if "{name}" not in template or "*" in template:
        raise ValueError(
            f"{key}={template!r} needs exactly one {{name}} (or one *) for the part images and "
            "masks share, e.g. images/{name}.tif or images/*.tif"
        )
    return template


def find_files(root: Path, template: str) -> dict[str, Path]:
    """``name -> path`` of the files under ``root`` matching ``template`` (with ``{name}``)."""
    regex = _pattern_regex(template)
    out = {}
    for path in sorted(root.glob(template.replace("{name}", "*"))):
        match = regex.match(path.relative_to(root).as_posix())
        if match and path.is_file():
            out[match["name"]] = path
    return out


class GeoTIFFFolder(GeoTIFFSegmentationDataset):
    """Any folder of image/mask GeoTIFF pairs (see the module docstring).

    Args:
        images: pattern of the image files relative to ``root`` (``{name}``, optional
            ``{split}``).
        masks: pattern of the mask files, with the same placeholders.
        available_bands: band names of the image files in order; null reads them from the
            GeoTIFF band descriptions.
        bands: the bands to load, by name (default: all).
        band_stats: ``{"mean": {band: v}, "std": {band: v}}``; null computes them over the
            training split (cached, see the module docstring).
        split_files: ``{"train": file, "val": file, "test": file}`` of names, relative to
            ``root``; for patterns without ``{split}``.
        val_fraction, test_fraction, split_seed: the seeded split used when neither
            ``{split}`` nor ``split_files`` says which file goes where.
        **kwargs: those of :class:`~datasets.base.GeoTIFFSegmentationDataset` (``classes``,
            ``ignore_index``, ``nodata``, ``reflectance_scale``, ``sensor``, ``gsd``, ...).
    """

    layout: ClassVar[str] = "the images/masks patterns of the dataset config"
    #: What the label files are called in messages, and the config key of their pattern.
    label_noun: ClassVar[str] = "mask"
    label_key: ClassVar[str] = "masks"

    def __init__(
        self,
        *,
        root: str,
        split: str,
        images: str = "{split}/{name}_image.tif",
        masks: str = "{split}/{name}_mask.tif",
        available_bands: list[str] | None = None,
        bands: list[str] | None = None,
        band_stats: dict[str, dict[str, float]] | None = None,
        split_files: dict[str, str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        label_offset: int = 0,
        **kwargs: Any,
    ) -> None:
        name, key = type(self).__name__, self.label_key
        images, masks = (
            _with_name(t, f"dataset.{k}") for k, t in (("images", images), (key, masks))
        )
        if ("{split}" in images) != ("{split}" in masks):
            raise ValueError(
                f"{name}: use {{split}} in both dataset.images and dataset.{key}, or in neither"
            )
        if not (
            0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1
        ):
            raise ValueError(
                f"{name}: val_fraction={val_fraction} and test_fraction={test_fraction} must be "
                "fractions in [0, 1) summing to less than 1"
            )
        if int(label_offset) < 0:
            raise ValueError(f"{name}: label_offset={label_offset} must be >= 0")
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise FileNotFoundError(
                f"{name}: dataset root {str(root_path)!r} does not exist; set dataset.root=<folder>"
            )
        self.images_pattern, self.masks_pattern = images, masks
        self.split_files = dict(split_files or {})
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed = int(split_seed)
        self.label_offset = int(label_offset)
        self.root = root_path
        self._classes_arg = list(kwargs.get("classes") or [])
        self._ignore_arg = kwargs.get("ignore_index", -1)
        self._splits = {s: self._pairs(s) for s in ("train", "val", "test")}
        first = next((p for s in self._splits.values() for p in s), None)
        if first is None:
            raise ValueError(
                f"{name}: no image/{self.label_noun} pair under {str(root_path)!r} matches "
                f"images={images!r} and {key}={masks!r}; check dataset.root and the two patterns"
            )
        sensor = self._sensor = kwargs.get("sensor") or type(self).sensor
        self._read_headers()
        images_ = [s.images["image"] for s in self._all_samples()]
        self.band_names = header_band_names(images_, available_bands, sensor, name)
        self.available_bands = self.band_names.bands
        self.band_sources = self.band_names.sources
        kwargs["nodata"] = declared_nodata(images_, kwargs.get("nodata"), name)
        bands = list(bands) if bands else list(self.available_bands)
        if band_stats is None:
            band_stats = self.training_stats(kwargs["nodata"])
        super().__init__(
            root=str(root_path), split=split, bands=bands, band_stats=band_stats, **kwargs
        )

    # ---- pairing and splits ------------------------------------------------------------------------
    def _pairs_of(self, split: str | None) -> list[Sample]:
        """Every image/label pair matching the patterns (of ``split`` when they have
        ``{split}``), by name; a label file without an image is an error."""
        fill = (lambda t: t.replace("{split}", split)) if split else (lambda t: t)
        images = find_files(self.root, fill(self.images_pattern))
        masks = find_files(self.root, fill(self.masks_pattern))
        orphans = sorted(set(masks) - set(images))
        if orphans:
            expected = self.root / fill(self.images_pattern).replace("{name}", orphans[0])
            raise FileNotFoundError(
                f"{type(self).__name__}: {len(orphans)} {self.label_noun}(s) without an image, "
                f"e.g. {str(masks[orphans[0]])!r} (expected {str(expected)!r}); restore the "
                f"images or fix dataset.images / dataset.{self.label_key}"
            )
        unlabelled = sorted(set(images) - set(masks))
        if unlabelled:
            log_once(log.warning, f"{len(unlabelled)} image(s) have no {self.label_noun} and "
                     f"are not used, e.g. {images[unlabelled[0]]}")  # fmt: skip
        return [Sample(name=n, mask=masks[n], images={"image": images[n]}) for n in sorted(masks)]

    def _pairs(self, split: str) -> list[Sample]:
        if "{split}" in self.images_pattern:
            return self._pairs_of(split)
        pairs = self.__dict__.get("_all_pairs")
        if pairs is None:
            pairs = self._all_pairs = self._pairs_of(None)
        if self.split_files:
            return self._listed(pairs, split)
        return seeded_split(pairs, split, self.val_fraction, self.test_fraction, self.split_seed)

    def _listed(self, pairs: list[Sample], split: str) -> list[Sample]:
        """The pairs named in ``split_files[split]`` (names or image file names)."""
        if split not in self.split_files:
            raise ValueError(
                f"{type(self).__name__}: split_files has no {split!r} entry; give "
                f"dataset.split_files.{split}=<file of names>"
            )
        path = self.root / self.split_files[split]
        if not path.is_file():
            raise FileNotFoundError(
                f"{type(self).__name__}: split file {str(path)!r} does not exist"
            )
        by_name = {p.name: p for p in pairs}
        by_file = {p.images["image"].name: p for p in pairs}
        out, unknown = [], []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            sample = by_name.get(line) or by_file.get(Path(line).name)
            (out if sample else unknown).append(sample or line)
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: {len(unknown)} name(s) of {str(path)!r} match no "
                f"image/{self.label_noun} pair, e.g. {unknown[:3]}; names are the {{name}} part of the patterns"
            )
        return out

    def list_samples(self, split: str) -> list[Sample]:
        return self._splits[split]

    # ---- bands and headers ---------------------------------------------------------------------
    def _all_samples(self) -> list[Sample]:
        return [s for pairs in self._splits.values() for s in pairs]

    def _read_headers(self) -> None:
        """Read the header of every image and label file (no pixels): image and label of a
        pair must have the same size, every image the first one's band count and CRS."""
        reference = None
        noun = self.label_noun
        for sample in self._all_samples():
            image, mask = sample.images["image"], sample.mask
            h, m = file_header(image), file_header(mask)
            if (m.height, m.width) != (h.height, h.width):
                raise ValueError(
                    f"{type(self).__name__}: image {str(image)!r} is {h.height}x{h.width} px but "
                    f"its {noun} {str(mask)!r} is {m.height}x{m.width}; every {noun} must cover "
                    f"its image pixel for pixel (resample or crop the {noun})"
                )
            if reference is None:
                reference = (image, h)
            elif h.count != reference[1].count or h.crs != reference[1].crs:
                raise ValueError(
                    f"{type(self).__name__}: {str(image)!r} has {h.count} bands in {h.crs}, but "
                    f"{str(reference[0])!r} has {reference[1].count} bands in {reference[1].crs}; "
                    "every image must have the same bands and CRS (reproject or split the folder)"
                )

    def read_image(self, sample: Sample) -> np.ndarray:
        """The bands ``self.bands`` of the sample, found by name in its own file's order."""
        return read_named_bands(sample.images["image"], self.band_names, self.bands,
                                self.georeferenced)  # fmt: skip

    def _validated_bands(self, bands: list[str]) -> list[str]:
        return super()._validated_bands([band_code(b, self._sensor) for b in bands])

    # ---- statistics ----------------------------------------------------------------------------
    def training_stats(self, nodata: float | None, force: bool = False) -> dict[str, dict]:
        """Per-band mean and std over the training images, cached in ``<root>/band_stats.json``
        (:func:`~datasets.raster_folder.cached_band_stats`); the training labels are checked
        before they are computed."""
        train = [s.images["image"] for s in self._splits["train"]]
        return cached_band_stats(self.root, train, self.band_names, nodata, type(self).__name__,
                                 "training images", force, self._check_training_masks)  # fmt: skip

    def _check_training_masks(self) -> None:
        for sample in self._splits["train"]:
            self._check_classes(sample, read_raster(sample.mask, [1])[0])

    # ---- masks ---------------------------------------------------------------------------------
    def _check_classes(self, sample: Sample, mask: np.ndarray) -> None:
        """A stored label that is neither a class id (after ``label_offset``), nor the ignore
        index, nor below the offset (unlabelled) is an error; the message suggests the fix."""
        classes, ignore = self._classes_arg, self._ignore_arg  # also before ``spec`` exists
        offset = self.label_offset
        values = np.unique(mask)
        if np.issubdtype(values.dtype, np.floating):
            values = values[np.isfinite(values)]  # non-finite labels are read as ignored
        bad = [
            int(v) for v in values
            if not (offset <= v < offset + len(classes)) and v != ignore and not 0 <= v < offset
        ]  # fmt: skip
        if not bad:
            return
        ids = f"{offset}..{offset + len(classes) - 1}"
        if offset == 0 and bad == [len(classes)] and 0 in values:
            hint = (
                f"if the masks number the classes from 1 with 0 for unlabelled pixels, set "
                f"dataset.label_offset=1 (ids 1..{len(classes)} become the classes, 0 is ignored)"
            )
        else:
            hint = (
                "add the classes to dataset.classes, set dataset.ignore_index to the value that "
                "marks unlabelled pixels, or dataset.label_offset=k when the classes are "
                "numbered from k"
            )
        raise ValueError(
            f"{type(self).__name__}: mask {str(sample.mask)!r} holds class id(s) {bad[:10]} "
            f"outside the {len(classes)} classes {classes} (stored ids {ids}, label_offset="
            f"{offset}) and not the ignore_index {ignore}; {hint}"
        )

    def read_mask(self, sample: Sample) -> np.ndarray:
        mask = super().read_mask(sample)
        self._check_classes(sample, mask)
        return mask


class GeoTIFFFolderRegression(GeoTIFFFolder):
    """``dataset=folder`` for pixel-wise regression: a float *target raster* per image instead
    of a class mask (``configs/dataset/folder_regression.yaml``).

    Layout: the patterns of :class:`GeoTIFFFolder`, ``targets`` instead of ``masks``::

        images: "{split}/{name}_image.tif"   targets: "{split}/{name}_target.tif"   # default

    A target raster covers its image pixel for pixel, one band per target (canopy height,
    biomass, a spectral index). A sample is ``{"image": float32 (C, H, W), "target": float32
    (T, H, W), "index": int}``; the target is NaN at every pixel without a valid target: the
    target's no-data value or NaN in the file, and pixels where no image band is valid (nothing
    to predict from); augmentation pads with NaN too (:class:`datasets.transforms.JointTransform`).

    Args:
        targets: pattern of the target rasters (``{name}``, optional ``{split}``).
        target_names: a name per target band, in file order; null reads the target files' band
            descriptions (``target`` / ``target1``, ``target2``, ... where they have none).
        target_nodata: the target value meaning "no target" (NaN always is); null takes the
            value the target files declare, if any.
        target_scale: the target in its units is the stored value times ``target_scale`` (e.g.
            0.01 for canopy heights stored in cm, to learn metres); default 1.
        **kwargs: those of :class:`GeoTIFFFolder` but ``masks``, ``classes`` and
            ``label_offset`` (a regression has no classes).
    """

    layout: ClassVar[str] = "the images/targets patterns of the dataset config"
    label_noun: ClassVar[str] = "target"
    label_key: ClassVar[str] = "targets"

    def __init__(self, *, root: str, split: str, targets: str = "{split}/{name}_target.tif",
                 target_names: list[str] | None = None, target_nodata: float | None = None,
                 target_scale: float = 1.0, **kwargs: Any) -> None:  # fmt: skip
        name = type(self).__name__
        for key in ("masks", "classes", "label_offset"):
            if key in kwargs:
                raise TypeError(
                    f"{name}: dataset.{key} is for segmentation; a regression dataset has "
                    "targets (dataset.targets, dataset.target_names) instead: remove it"
                )
        scale = float(target_scale)
        if not (np.isfinite(scale) and scale != 0):
            raise ValueError(
                f"{name}: target_scale={target_scale} must be a finite non-zero number (the "
                "target is the stored value times target_scale)"
            )
        self.target_scale = scale
        self._target_names_arg = None if target_names is None else [str(t) for t in target_names]
        self._target_nodata_arg = target_nodata
        super().__init__(root=root, split=split, masks=targets, classes=[], **kwargs)

    # ---- the targets' facts, read from their headers -----------------------------------------
    def _read_headers(self) -> None:
        """Besides the image checks: every target raster has the same number of bands, the
        target names (one per band) and the targets' no-data value are settled."""
        super()._read_headers()
        name = type(self).__name__
        files = [s.mask for s in self._all_samples()]
        first = file_header(files[0])
        for path in files[1:]:
            if file_header(path).count != first.count:
                raise ValueError(
                    f"{name}: target raster {str(path)!r} has {file_header(path).count} bands "
                    f"but {str(files[0])!r} has {first.count}; every target raster must hold "
                    "the same targets"
                )
        self.target_names = self._names_of_targets(files[0], first)
        self.target_nodata = declared_nodata(files, self._target_nodata_arg, name, "target")

    def _names_of_targets(self, path: Path, header: FileHeader) -> list[str]:
        """``target_names`` when given (one per band), else the band descriptions."""
        name = type(self).__name__
        given = self._target_names_arg
        if given is not None:
            if len(given) != header.count or len(set(given)) != len(given):
                raise ValueError(
                    f"{name}: dataset.target_names={given} must name each of the {header.count} "
                    f"band(s) of the target rasters (e.g. {str(path)!r}) once, in file order"
                )
            return given
        if all(header.descriptions):
            return [str(d) for d in header.descriptions]
        names = ["target"] if header.count == 1 else [f"target{i + 1}" for i in range(header.count)]
        log_once(log.info, f"{name}: the target rasters (e.g. {str(path)!r}) have no band "
                 f"descriptions: their targets are called {names}; set dataset.target_names "
                 "to name them")  # fmt: skip
        return names

    # ---- no classes: the data description holds the targets ---------------------------------
    def _validated_classes(self, classes: list[str]) -> list[str]:
        return []

    def _spec_extras(self) -> dict[str, Any]:
        return {"targets": tuple(self.target_names)}

    def _check_training_masks(self) -> None:
        """Nothing to check before the statistics: any float is a target."""

    # ---- reading -------------------------------------------------------------------------------
    def read_target(self, sample: Sample) -> np.ndarray:
        """The target raster of ``sample`` in target units: (T, H, W) float32, NaN where the
        file holds NaN or the targets' no-data value."""
        raw = read_raster(sample.mask, None, self.georeferenced)  # (T, H, W), the file's dtype
        return invalid_to_nan(raw, self.target_nodata) * np.float32(self.target_scale)

    def read_sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw image (C, H, W) float32 with NaN at invalid pixels, and the target (T, H, W)
        float32 with NaN at every pixel without a valid target, or without a valid band."""
        sample = self.samples[index]
        image = invalid_to_nan(np.asarray(self.read_image(sample)), self.spec.nodata)
        target = self.read_target(sample)
        if image.shape[1:] != target.shape[1:]:
            raise ValueError(
                f"{type(self).__name__}: sample {sample.name!r} has image {image.shape[1:]} but "
                f"target {target.shape[1:]} ({str(sample.mask)!r}); image and target must align"
            )
        target[:, np.isnan(image).all(axis=0)] = np.nan  # nothing to predict from
        return image, target

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, target = self.read_sample(index)
        image_t, target_t = torch.from_numpy(image), torch.from_numpy(target)
        if self.transform is not None:
            image_t, target_t = self.transform(image_t, target_t)
        sample = {"image": image_t, "target": target_t, "index": index}
        sample.update(self.sample_metadata(index))
        return sample

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"samples={len(self)}, bands={self.bands}, targets={self.target_names})"
        )
