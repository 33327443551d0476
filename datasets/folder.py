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
(``scripts/compute_stats.py`` does the same up front and prints them for the config).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from datasets.base import GeoTIFFSegmentationDataset, Sample, _open_raster, read_raster
from deflect.data import canonical_band
from deflect.io import atomic_path

log = logging.getLogger(__name__)

STATS_FILE = "band_stats.json"
STATS_VERSION = 1


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


def file_record(path: Path) -> dict[str, int]:
    """Size and modification time: what the statistics cache compares."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def compute_band_stats(
    images: list[Path], nodata: float | None
) -> tuple[list[float], list[float], list[int]]:
    """Mean, standard deviation (population) and number of valid pixels of every band over
    ``images``, in file units: NaN, infinities and ``nodata`` are left out. Files are combined
    exactly with Chan et al.'s pairwise update (float64), one file in memory at a time.

    Raises:
        ValueError: a band without a single valid pixel.
    """
    count = mean = m2 = None
    for path in images:
        with _open_raster(path) as src:
            raw = src.read()  # (C, H, W) in the file's dtype
        valid = (
            np.isfinite(raw) if np.issubdtype(raw.dtype, np.floating) else np.ones(raw.shape, bool)
        )
        if nodata is not None:
            valid &= raw != nodata
        x = raw.astype(np.float64)
        n_f = valid.sum(axis=(1, 2)).astype(np.float64)  # (C,)
        sums = np.where(valid, x, 0.0).sum(axis=(1, 2))
        mean_f = np.divide(sums, n_f, out=np.zeros_like(sums), where=n_f > 0)
        m2_f = np.where(valid, (x - mean_f[:, None, None]) ** 2, 0.0).sum(axis=(1, 2))
        if count is None:
            count, mean, m2 = n_f, mean_f, m2_f
            continue
        total = count + n_f
        delta = mean_f - mean
        safe = np.where(total > 0, total, 1.0)
        mean = mean + delta * n_f / safe
        m2 = m2 + m2_f + delta**2 * count * n_f / safe
        count = total
    empty = [i for i, n in enumerate(count) if n == 0]
    if empty:
        raise ValueError(f"band(s) {empty} have no valid pixel in the training images")
    std = np.sqrt(m2 / count)
    return mean.tolist(), std.tolist(), count.astype(int).tolist()


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
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        images, masks = (
            _with_name(t, f"dataset.{k}") for k, t in (("images", images), ("masks", masks))
        )
        if ("{split}" in images) != ("{split}" in masks):
            raise ValueError(
                f"{name}: use {{split}} in both dataset.images and dataset.masks, or in neither"
            )
        if not (
            0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1
        ):
            raise ValueError(
                f"{name}: val_fraction={val_fraction} and test_fraction={test_fraction} must be "
                "fractions in [0, 1) summing to less than 1"
            )
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise FileNotFoundError(
                f"{name}: dataset root {str(root_path)!r} does not exist; set dataset.root=<folder>"
            )
        self.images_pattern, self.masks_pattern = images, masks
        self.split_files = dict(split_files or {})
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed = int(split_seed)
        self.root = root_path
        self._classes_arg = list(kwargs.get("classes") or [])
        self._ignore_arg = kwargs.get("ignore_index", -1)
        self._splits = {s: self._pairs(s) for s in ("train", "val", "test")}
        first = next((p for s in self._splits.values() for p in s), None)
        if first is None:
            raise ValueError(
                f"{name}: no image/mask pair under {str(root_path)!r} matches images={images!r} "
                f"and masks={masks!r}; check dataset.root and the two patterns"
            )
        self.available_bands = self._file_bands(first.images["image"], available_bands)
        self._check_headers(first.images["image"])
        bands = list(bands) if bands else list(self.available_bands)
        nodata = kwargs.get("nodata")
        if band_stats is None:
            band_stats = self.training_stats(nodata)
        super().__init__(
            root=str(root_path), split=split, bands=bands, band_stats=band_stats, **kwargs
        )

    # ---- pairing and splits ------------------------------------------------------------------------
    def _pairs_of(self, split: str | None) -> list[Sample]:
        """Every image/mask pair matching the patterns (of ``split`` when they have
        ``{split}``), by name; a mask without an image is an error."""
        fill = (lambda t: t.replace("{split}", split)) if split else (lambda t: t)
        images = find_files(self.root, fill(self.images_pattern))
        masks = find_files(self.root, fill(self.masks_pattern))
        orphans = sorted(set(masks) - set(images))
        if orphans:
            expected = self.root / fill(self.images_pattern).replace("{name}", orphans[0])
            raise FileNotFoundError(
                f"{type(self).__name__}: {len(orphans)} mask(s) without an image, e.g. "
                f"{str(masks[orphans[0]])!r} (expected {str(expected)!r}); restore the images or "
                "fix dataset.images / dataset.masks"
            )
        unlabelled = sorted(set(images) - set(masks))
        if unlabelled:
            log.warning("%d image(s) have no mask and are not used, e.g. %s", len(unlabelled),
                        images[unlabelled[0]])  # fmt: skip
        return [Sample(name=n, mask=masks[n], images={"image": images[n]}) for n in sorted(masks)]

    def _pairs(self, split: str) -> list[Sample]:
        if "{split}" in self.images_pattern:
            return self._pairs_of(split)
        pairs = self.__dict__.get("_all_pairs")
        if pairs is None:
            pairs = self._all_pairs = self._pairs_of(None)
        if self.split_files:
            return self._listed(pairs, split)
        order = np.random.default_rng(self.split_seed).permutation(len(pairs))
        n_test = round(self.test_fraction * len(pairs))
        n_val = round(self.val_fraction * len(pairs))
        chosen = {"test": order[:n_test], "val": order[n_test : n_test + n_val],
                  "train": order[n_test + n_val :]}[split]  # fmt: skip
        return [pairs[i] for i in sorted(chosen)]

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
                f"image/mask pair, e.g. {unknown[:3]}; names are the {{name}} part of the patterns"
            )
        return out

    def list_samples(self, split: str) -> list[Sample]:
        return self._splits[split]

    # ---- bands and headers ---------------------------------------------------------------------
    def _file_bands(self, image: Path, available_bands: list[str] | None) -> list[str]:
        with _open_raster(image) as src:
            count, descriptions = src.count, src.descriptions
        if available_bands is None:
            if not all(descriptions):
                raise ValueError(
                    f"{type(self).__name__}: {str(image)!r} has no band descriptions to name its "
                    f"{count} bands; give dataset.available_bands=[...] in file order"
                )
            return [canonical_band(d) for d in descriptions]
        bands = [canonical_band(b) for b in available_bands]
        if len(bands) != count:
            raise ValueError(
                f"{type(self).__name__}: dataset.available_bands lists {len(bands)} bands {bands} "
                f"but {str(image)!r} has {count}"
            )
        return bands

    def _check_headers(self, reference: Path) -> None:
        """Every image has the reference's band count and CRS."""
        with _open_raster(reference) as src:
            count, crs = src.count, src.crs
        for sample in (s for pairs in self._splits.values() for s in pairs):
            with _open_raster(sample.images["image"]) as src:
                if src.count != count or src.crs != crs:
                    raise ValueError(
                        f"{type(self).__name__}: {str(sample.images['image'])!r} has {src.count} "
                        f"bands in {src.crs}, but {str(reference)!r} has {count} bands in {crs}; "
                        "every image must have the same bands and CRS (reproject or split the "
                        "folder)"
                    )

    def _validated_bands(self, bands: list[str]) -> list[str]:
        return super()._validated_bands([canonical_band(b) for b in bands])

    # ---- statistics ----------------------------------------------------------------------------
    def training_stats(self, nodata: float | None, force: bool = False) -> dict[str, dict]:
        """Per-band mean and std over the training images: read from ``<root>/band_stats.json``
        when it was computed from exactly these files, else computed and cached."""
        train = [s.images["image"] for s in self._splits["train"]]
        if not train:
            raise ValueError(
                f"{type(self).__name__}: no training images to compute band statistics from"
            )
        files = {p.relative_to(self.root).as_posix(): file_record(p) for p in train}
        key = {
            "version": STATS_VERSION,
            "bands": self.available_bands,
            "nodata": nodata,
            "files": files,
        }
        cache = self.root / STATS_FILE
        if cache.is_file() and not force:
            try:
                saved = json.loads(cache.read_text())
                if {k: saved.get(k) for k in key} == key:
                    log.info("band statistics from %s (%d training images)", cache, len(files))
                    return {"mean": saved["mean"], "std": saved["std"]}
            except (OSError, ValueError):
                pass
        start = time.time()
        self._check_training_masks()
        mean, std, pixels = compute_band_stats(train, nodata)
        stats = {
            "mean": dict(zip(self.available_bands, mean)),
            "std": dict(zip(self.available_bands, std)),
        }
        log.info(
            "computed band statistics over %d training images in %.1f s",
            len(train),
            time.time() - start,
        )
        try:
            with atomic_path(cache) as tmp:
                tmp.write_text(
                    json.dumps(
                        {**key, **stats, "pixels": dict(zip(self.available_bands, pixels))},
                        indent=1,
                    )
                )
            log.info("cached them in %s; they are recomputed when those files change", cache)
        except OSError as err:
            log.warning(
                "could not cache band statistics in %s (%s); they are recomputed next time",
                cache,
                err,
            )
        return stats

    def _check_training_masks(self) -> None:
        for sample in self._splits["train"]:
            self._check_classes(sample, read_raster(sample.mask, [1])[0])

    # ---- masks ---------------------------------------------------------------------------------
    def _check_classes(self, sample: Sample, mask: np.ndarray) -> None:
        """A class id outside the class list (and not the ignore index) is an error."""
        classes, ignore = self._classes_arg, self._ignore_arg  # also before ``spec`` exists
        values = np.unique(mask)
        if np.issubdtype(values.dtype, np.floating):
            values = values[np.isfinite(values)]  # non-finite labels are read as ignored
        bad = [int(v) for v in values if not (0 <= v < len(classes)) and v != ignore]
        if bad:
            raise ValueError(
                f"{type(self).__name__}: mask {str(sample.mask)!r} holds class id(s) {bad[:10]} "
                f"outside the {len(classes)} classes {classes} (ids 0..{len(classes) - 1}) and "
                f"not the ignore_index {ignore}; add the classes to dataset.classes or set "
                "dataset.ignore_index to the value that marks unlabelled pixels"
            )

    def read_mask(self, sample: Sample) -> np.ndarray:
        mask = super().read_mask(sample)
        self._check_classes(sample, mask)
        return mask
