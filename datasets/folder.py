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

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from datasets.base import (
    GeoTIFFSegmentationDataset,
    Sample,
    _open_raster,
    _read_bands,
    read_raster,
    seeded_split,
)
from deflect.data import canonical_band, resolve_band_name, sensor_band_codes
from deflect.io import atomic_path

log = logging.getLogger(__name__)

STATS_FILE = "band_stats.json"
STATS_VERSION = 2  # 2: file records hold a content fingerprint and the file's band order


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


#: Bytes of a file hashed for the statistics cache: this many chunks of this size, spread evenly.
FINGERPRINT_CHUNKS, FINGERPRINT_CHUNK = 16, 4096


def content_fingerprint(path: Path) -> str:
    """A cheap digest of a file's contents: BLAKE2 of 16 chunks of 4 KiB spread over it (the
    whole file when smaller). Catches contents rewritten with size and time kept."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= FINGERPRINT_CHUNKS * FINGERPRINT_CHUNK:
            digest.update(f.read())
        else:
            step = (size - FINGERPRINT_CHUNK) // (FINGERPRINT_CHUNKS - 1)
            for i in range(FINGERPRINT_CHUNKS):
                f.seek(i * step)
                digest.update(f.read(FINGERPRINT_CHUNK))
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """Size, modification time and a content fingerprint: what the statistics cache compares."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "content": content_fingerprint(path)}  # fmt: skip


@dataclass(frozen=True)
class FileHeader:
    """What a GeoTIFF's header says (no pixels read)."""

    height: int
    width: int
    count: int
    crs: Any
    descriptions: tuple[str | None, ...]
    nodata: float | None


_HEADERS: dict[tuple[Path, int, int], FileHeader] = {}


def file_header(path: Path) -> FileHeader:
    """The header of ``path``, cached by path, size and time (the three splits of a dataset
    are built from the same files)."""
    stat = Path(path).stat() if Path(path).is_file() else None
    key = (Path(path), stat.st_size, stat.st_mtime_ns) if stat else None
    if key is not None and key in _HEADERS:
        return _HEADERS[key]
    with _open_raster(path) as src:
        header = FileHeader(src.height, src.width, src.count, src.crs, tuple(src.descriptions),
                            src.nodata)  # fmt: skip
    if key is not None:
        _HEADERS[key] = header
    return header


_LOGGED: set[str] = set()


def log_once(emit, message: str) -> None:
    """Log ``message`` once per process (the three splits of a dataset say the same things)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        emit(message)


def _codes(sensor: str) -> set[str]:
    try:
        return set(sensor_band_codes(sensor))
    except ValueError:
        return set()


def resolve_bands(names: list[str], sensor: str, source: str, fix: str, owner: str) -> list[str]:
    """Band names as files and configs give them (codes, common names, wavelengths) -> the
    framework's codes for ``sensor``; short codes spyndex does not know (VV, VH, DEM) are kept.

    Raises:
        ValueError: a name that maps to nothing, or two names mapping to one band.
    """
    out = []
    for given in names:
        band = resolve_band_name(given, sensor)
        if band is None:
            canon = canonical_band(given)
            if re.fullmatch(r"[A-Z][A-Z0-9]{0,3}", canon):  # a code (VV, VH, HH, DEM, ...)
                band = canon
            else:
                raise ValueError(
                    f"{owner}: band {given!r} of {source} is neither a band of sensor {sensor!r} "
                    f"({sorted(_codes(sensor))}) nor a common name (Blue, Green, Red, NIR, NIR "
                    f"Narrow, Red Edge 1, SWIR 1, SWIR 2, ...) or a wavelength (842 nm) of one; {fix}"
                )
        out.append(band)
    repeated = sorted({b for b in out if out.count(b) > 1})
    if repeated:
        raise ValueError(
            f"{owner}: {source} names bands {names}, which map to {out}: {repeated} twice; {fix}"
        )
    return out


def compute_band_stats(
    images: list[Path], nodata: float | None, orders: list[list[int]] | None = None
) -> tuple[list[float], list[float], list[int]]:
    """Mean, standard deviation (population) and number of valid pixels of every band over
    ``images``, in file units: NaN, infinities and ``nodata`` are left out. Files are combined
    exactly with Chan et al.'s pairwise update (float64), one file in memory at a time.

    Args:
        images: the files.
        nodata: the no-data value, or None.
        orders: per file, the 1-based band numbers to read, in the output's band order (files
            whose bands are in another order); None reads every band in file order.

    Raises:
        ValueError: a band without a single valid pixel.
        OSError: a file whose pixels cannot be read (names it).
    """
    count = mean = m2 = None
    for i, path in enumerate(images):
        with _open_raster(path) as src:
            raw = _read_bands(src, path, orders[i] if orders else None)  # (C, H, W)
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
        label_offset: int = 0,
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
                f"{name}: no image/mask pair under {str(root_path)!r} matches images={images!r} "
                f"and masks={masks!r}; check dataset.root and the two patterns"
            )
        sensor = self._sensor = kwargs.get("sensor") or type(self).sensor
        headers = self._read_headers()
        self.available_bands, self.band_sources = self._band_names(
            headers, first.images["image"], available_bands, sensor
        )
        kwargs["nodata"] = self._nodata(headers, kwargs.get("nodata"))
        bands = list(bands) if bands else list(self.available_bands)
        if band_stats is None:
            band_stats = self.training_stats(kwargs["nodata"])
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
            log_once(log.warning, f"{len(unlabelled)} image(s) have no mask and are not used, "
                     f"e.g. {images[unlabelled[0]]}")  # fmt: skip
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
                f"image/mask pair, e.g. {unknown[:3]}; names are the {{name}} part of the patterns"
            )
        return out

    def list_samples(self, split: str) -> list[Sample]:
        return self._splits[split]

    # ---- bands and headers ---------------------------------------------------------------------
    def _all_samples(self) -> list[Sample]:
        return [s for pairs in self._splits.values() for s in pairs]

    def _read_headers(self) -> dict[Path, FileHeader]:
        """The header of every image and mask (no pixels read); image and mask of a pair must
        have the same size, every image the first one's band count and CRS."""
        headers: dict[Path, FileHeader] = {}
        reference = None
        for sample in self._all_samples():
            image, mask = sample.images["image"], sample.mask
            headers[image] = h = file_header(image)
            headers[mask] = m = file_header(mask)
            if (m.height, m.width) != (h.height, h.width):
                raise ValueError(
                    f"{type(self).__name__}: image {str(image)!r} is {h.height}x{h.width} px but "
                    f"its mask {str(mask)!r} is {m.height}x{m.width}; every mask must cover its "
                    "image pixel for pixel (resample or crop the mask)"
                )
            if reference is None:
                reference = (image, h)
            elif h.count != reference[1].count or h.crs != reference[1].crs:
                raise ValueError(
                    f"{type(self).__name__}: {str(image)!r} has {h.count} bands in {h.crs}, but "
                    f"{str(reference[0])!r} has {reference[1].count} bands in {reference[1].crs}; "
                    "every image must have the same bands and CRS (reproject or split the folder)"
                )
        return headers

    def _resolve(self, names: list[str], sensor: str, source: str, fix: str) -> list[str]:
        return resolve_bands(names, sensor, source, fix, type(self).__name__)

    def _band_names(
        self,
        headers: dict[Path, FileHeader],
        first: Path,
        available_bands: list[str] | None,
        sensor: str,
    ) -> tuple[list[str], dict[str, str]]:
        """The bands of the images, by name, and how the files (or the config) name each.

        From ``available_bands`` (the same order for every file) or, when it is null, from
        each file's own band descriptions: every file is read by name, whatever its order.
        """
        fix = "give dataset.available_bands=[...] in file order"
        self._file_orders: dict[Path, list[str]] = {}
        count = headers[first].count
        if available_bands is not None:
            bands = self._resolve(
                [str(b) for b in available_bands], sensor, "dataset.available_bands",
                "fix dataset.available_bands",
            )  # fmt: skip
            if len(bands) != count:
                raise ValueError(
                    f"{type(self).__name__}: dataset.available_bands lists {len(bands)} bands "
                    f"{bands} but {str(first)!r} has {count}"
                )
            return bands, dict(zip(bands, (str(b) for b in available_bands)))
        reference = None
        for sample in self._all_samples():
            image = sample.images["image"]
            descriptions = headers[image].descriptions
            if not all(descriptions):
                raise ValueError(
                    f"{type(self).__name__}: {str(image)!r} has no band descriptions to name "
                    f"its {headers[image].count} bands; {fix}"
                )
            order = self._resolve(list(descriptions), sensor, f"{str(image)!r}", fix)
            if reference is None:
                reference = (image, order, list(descriptions))
            elif set(order) != set(reference[1]):
                raise ValueError(
                    f"{type(self).__name__}: {str(image)!r} has bands {order} but "
                    f"{str(reference[0])!r} has {reference[1]}; every image must hold the same "
                    "bands (in any order: they are read by name)"
                )
            self._file_orders[image] = order
        _, bands, names = reference
        return bands, dict(zip(bands, names))

    def _nodata(self, headers: dict[Path, FileHeader], nodata: float | None) -> float | None:
        """The no-data value: ``dataset.nodata`` when given, else the one the image files
        declare (they must agree)."""
        declared: dict[float, Path] = {}
        for sample in self._all_samples():
            value = headers[sample.images["image"]].nodata
            if value is not None and not np.isnan(value):
                declared.setdefault(float(value), sample.images["image"])
        if nodata is not None:
            other = {v: p for v, p in declared.items() if v != float(nodata)}
            if other:
                value, path = next(iter(other.items()))
                log_once(
                    log.warning,
                    f"{type(self).__name__}: dataset.nodata={nodata:g} overrides the no-data "
                    f"value {value:g} that {str(path)!r} declares: pixels of {value:g} are read "
                    "as data",
                )
            return nodata
        if len(declared) > 1:
            (a, pa), (b, pb) = list(declared.items())[:2]
            raise ValueError(
                f"{type(self).__name__}: the image files declare different no-data values: "
                f"{a:g} in {str(pa)!r}, {b:g} in {str(pb)!r}; set dataset.nodata to the value "
                "that marks missing pixels in all of them (or fix the files' no-data tags)"
            )
        if declared:
            value, path = next(iter(declared.items()))
            log_once(
                log.info,
                f"no-data value {value:g} from the image files' headers (e.g. {str(path)!r}); "
                "dataset.nodata overrides it",
            )
            return value
        return None

    def read_image(self, sample: Sample) -> np.ndarray:
        """The bands ``self.bands`` of the sample, found by name in its own file's order."""
        path = sample.images["image"]
        order = self._file_orders.get(path, self.available_bands)
        with _open_raster(path, self.georeferenced) as src:
            if src.count != len(order):
                raise ValueError(
                    f"GeoTIFF {str(path)!r} has {src.count} bands but {len(order)} were expected "
                    f"({order}); the file changed since the dataset was listed"
                )
            return _read_bands(src, path, [order.index(b) + 1 for b in self.bands])

    def _validated_bands(self, bands: list[str]) -> list[str]:
        return super()._validated_bands(
            [resolve_band_name(b, self._sensor) or canonical_band(b) for b in bands]
        )

    # ---- statistics ----------------------------------------------------------------------------
    def training_stats(self, nodata: float | None, force: bool = False) -> dict[str, dict]:
        """Per-band mean and std over the training images: read from ``<root>/band_stats.json``
        when it was computed from exactly these files (size, time, a sample of their bytes, band
        order), else computed and cached."""
        train = [s.images["image"] for s in self._splits["train"]]
        if not train:
            raise ValueError(
                f"{type(self).__name__}: no training images to compute band statistics from"
            )
        files = {}
        for path in train:
            record = file_record(path)
            order = self._file_orders.get(path)
            if order is not None and order != self.available_bands:
                record["bands"] = order
            files[path.relative_to(self.root).as_posix()] = record
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
                    log_once(log.info, f"band statistics from {cache} ({len(files)} training "
                             "images)")  # fmt: skip
                    return {"mean": saved["mean"], "std": saved["std"]}
            except (OSError, ValueError):
                pass
        start = time.time()
        self._check_training_masks()
        orders = [
            [self._file_orders.get(p, self.available_bands).index(b) + 1
             for b in self.available_bands]
            for p in train
        ]  # fmt: skip
        mean, std, pixels = compute_band_stats(train, nodata, orders)
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
