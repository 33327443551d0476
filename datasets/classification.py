"""Image-level datasets: a class (or a set of labels) per image.

A sample is ``{"image": float32 (C, H, W), "label": int64 scalar (single-label) or float32
multi-hot (K,) (multi-label), "index": int}``; invalid pixels are NaN, as everywhere. The
transform (``datasets.transforms.ImageTransform``) brings every image to the encoder's size.

:class:`ChipFolder` reads your own GeoTIFF chips, labelled one of two ways::

    <root>/<split>/<class>/<name>.tif             labels: folders (the class is the folder)
    <root>/labels.csv + <root>/images/<name>.tif  labels: labels.csv (columns name,label[,split];
                                                  a multi-label label is "class;class;...")

with the conventions of ``dataset=folder``, from the same raster-folder layer
(:mod:`datasets.raster_folder`): band names from each file's band descriptions (read by name
per file; codes, common names or wavelengths), the no-data value the files declare, statistics
computed over the training chips and cached in ``<root>/band_stats.json``; a seeded split when
the layout has none (:func:`deflect.rasters.seeded_split`, stratified by class for single-label
chips), errors naming the file and the fix.

A labels CSV is read as a spreadsheet writes it (a byte-order mark; ``,``, ``;`` or a tab
between columns, found from the header); a chip listed twice, a name leaving the root and a
fractional numeric label are refused naming the lines. Class names are stripped and sorted
(numerically when they are integers); near-duplicates and classes without a validation or test
chip are warned about.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.base import SPLITS, ReflectanceCheck, SpecView
from datasets.raster_folder import (
    cached_band_stats,
    declared_nodata,
    header_band_names,
    log_once,
    read_named_bands,
)
from deflect.data import DataSpec, check_bool, invalid_to_nan
from deflect.rasters import seeded_split

log = logging.getLogger(__name__)


#: Chip files: GeoTIFFs. GDAL's sidecars beside them (``.aux.xml``, ``.ovr``, ``.msk``) are not.
RASTER_SUFFIXES = (".tif", ".tiff")
INTEGER = re.compile(r"[+-]?\d+")
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
#: Delimiters a labels CSV may use (Excel writes ``;`` where the decimal mark is a comma).
DELIMITERS = (",", ";", "\t")


def sort_classes(names: set[str] | list[str]) -> list[str]:
    """Class names sorted: numerically when every one is an integer (0, 1, 2, ..., 10), else
    as text."""
    names = list(names)
    if names and all(INTEGER.fullmatch(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def check_class_list(classes: object, owner: str) -> None:
    """Refuse ``dataset.classes`` that is not a list (or null): a string would be read as its
    letters, one class each."""
    if classes is not None and (isinstance(classes, (str, bytes))
                                or not isinstance(classes, (list, tuple))):  # fmt: skip
        raise ValueError(
            f"{owner}: dataset.classes={classes!r}: expected a list of class names (or null for "
            "those of the data); e.g. dataset.classes=[forest,field,water]"
        )


def warn_near_duplicates(classes: list[str], owner: str) -> None:
    """Warn once about class names that differ only in case, spaces, ``_`` or ``-``
    (``Forest``, ``forest``): two classes to the model, probably one to their author."""
    groups: dict[str, list[str]] = {}
    for c in classes:
        groups.setdefault(re.sub(r"[\s_\-]+", "", c).casefold(), []).append(c)
    for group in groups.values():
        if len(group) > 1:
            log_once(log.warning, (
                f"{owner}: classes {group} differ only in case, spaces, '_' or '-': they are "
                "different classes here; if they are one, give them one name (the folders, or "
                "the CSV's labels)"
            ))  # fmt: skip


def read_label_csv(path: Path, owner: str) -> list[tuple[int, dict[str, str]]]:
    """The rows of a labels CSV with their line numbers: ``(line, {column: stripped value})``.

    Reads UTF-8 with or without Excel's byte-order mark; the delimiter (``,``, ``;`` or a tab)
    is the one that splits the header into columns holding ``name`` and ``label``.

    Raises:
        ValueError: naming the file and what was found (the header, a row with another number
            of fields, text that is not UTF-8).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no part of "name"
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{owner}: {str(path)!r} is not UTF-8 text ({err}); save it as CSV UTF-8"
        ) from err
    lines = text.splitlines()
    header = lines[0] if lines else ""
    for delimiter in DELIMITERS:
        columns = [c.strip() for c in next(csv.reader([header], delimiter=delimiter), [])]
        if {"name", "label"} <= set(columns):
            break
    else:
        raise ValueError(
            f"{owner}: {str(path)!r} needs a header with the columns name and label (and "
            f"optionally split), separated by ',', ';' or a tab; its first line is {header!r}"
        )
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    next(reader)
    rows = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(columns):
            hint = ' (quote a ;-separated label set: "a;b")' if delimiter == ";" else ""
            raise ValueError(
                f"{owner}: line {reader.line_num} of {str(path)!r} has {len(cells)} field(s) "
                f"{cells} for the {len(columns)} columns {columns} of the header{hint}"
            )
        rows.append((reader.line_num, {k: v.strip() for k, v in zip(columns, cells)}))
    if not rows:
        raise ValueError(f"{owner}: {str(path)!r} lists no chip under its header {header!r}")
    return rows


class ImageClassificationDataset(SpecView, ReflectanceCheck, Dataset):
    """Base of the image-level datasets: the data description and the sample dicts.

    Subclasses set ``self.names`` (sample names of the split) and implement
    :meth:`read_image` and :meth:`read_label`.

    Args:
        split: ``train``, ``val`` or ``test``.
        bands: the bands to load, by name, in this order.
        classes: class (label) names.
        band_stats: ``{"mean": {band: v}, "std": {band: v}}`` in file units.
        multi_label: a set of labels per image (multi-hot) instead of one class.
        ignore_index: single-label: the label of images without a class (left out).
        reflectance_scale, nodata, sensor, gsd, display_bands: as for the segmentation datasets.
        transform: ``(image, label) -> (image, label)``, normally an ``ImageTransform``.
    """

    def __init__(self, *, split: str, bands: list[str], classes: list[str],
                 band_stats: dict[str, dict[str, float]], multi_label: bool = False,
                 ignore_index: int = -1, reflectance_scale: float = 1.0,
                 nodata: float | None = None, sensor: str = "sentinel2a",
                 gsd: float | None = None, display_bands: list[str] | None = None,
                 transform=None) -> None:  # fmt: skip
        name = type(self).__name__
        if split not in SPLITS:
            raise ValueError(f"{name}: split {split!r} is not one of {list(SPLITS)}")
        minimum = 1 if multi_label else 2
        if len(list(classes)) < minimum:
            raise ValueError(
                f"{name}: {len(list(classes))} class(es) {list(classes)}; classification needs "
                f"at least {minimum}: list them in dataset.classes"
            )
        self.split = split
        self.multi_label = check_bool(multi_label, "dataset.multi_label")
        try:
            self.spec = DataSpec(
                bands=tuple(bands), mean=band_stats["mean"], std=band_stats["std"],
                reflectance_scale=reflectance_scale, nodata=nodata, sensor=sensor, gsd=gsd,
                classes=tuple(classes), ignore_index=ignore_index,
                display_bands=None if display_bands is None else tuple(display_bands),
            )  # fmt: skip
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        self.transform = transform
        self.names: list[str] = []

    # ---- what a subclass gives ----------------------------------------------------------------
    def read_image(self, index: int) -> np.ndarray:
        """The bands ``self.bands`` of sample ``index`` in the file's dtype: (C, H, W)."""
        raise NotImplementedError

    def read_label(self, index: int) -> int | np.ndarray:
        """The class id, or the multi-hot label set, of sample ``index``."""
        raise NotImplementedError

    # ---- samples --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def sample_name(self, index: int) -> str:
        return self.names[index]

    def read_sample(self, index: int) -> tuple[np.ndarray, Any]:
        """The image (C, H, W) float32 with NaN at invalid pixels, and the label.

        An image without a single valid pixel carries no data to classify: its label becomes
        ``ignore_index`` (every entry of a multi-hot set), so it is never trained on nor scored,
        the rule segmentation applies to a pixel without a valid band. ``predictions.csv``
        leaves its label and prediction empty, and the test log counts such images.
        """
        image = invalid_to_nan(np.asarray(self.read_image(index)), self.spec.nodata)
        label = self.read_label(index)
        if np.isnan(image).all():
            label = (np.full(self.num_classes, self.ignore_index, dtype=np.float32)
                     if self.multi_label else self.ignore_index)  # fmt: skip
        return image, label

    def label_tensor(self, label: int | np.ndarray) -> torch.Tensor:
        if self.multi_label:
            return torch.as_tensor(np.asarray(label, dtype=np.float32))  # (K,)
        return torch.tensor(int(label), dtype=torch.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.read_sample(index)
        image_t, label_t = torch.from_numpy(image), self.label_tensor(label)
        if self.transform is not None:
            image_t, label_t = self.transform(image_t, label_t)
        sample = {"image": image_t, "label": label_t, "index": index}
        if self.spec.gsd is not None:
            sample["gsd"] = torch.tensor(self.spec.gsd, dtype=torch.float32)
        return sample

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, samples={len(self)}, "
                f"bands={self.bands}, classes={self.num_classes}, multi_label={self.multi_label})")  # fmt: skip


class ChipFolder(ImageClassificationDataset):
    """Your own GeoTIFF chips, labelled by folder or by a CSV (see the module docstring).

    Args:
        root: the folder.
        split: ``train``, ``val`` or ``test``.
        labels: ``folders`` (``<root>/<split>/<class>/<name>.tif``) or the path of a CSV
            relative to ``root`` (columns ``name``, ``label`` and optionally ``split``).
        images: with a CSV, where a chip named ``name`` is (``{name}`` in the pattern).
        classes: class names; default: the class folders, or the labels of the CSV, sorted.
        multi_label: CSV labels are sets, ``;``-separated.
        available_bands: band names in file order; default: each file's band descriptions.
        bands: the bands to load (default: all).
        band_stats: default: computed over the training chips and cached.
        val_fraction, test_fraction, split_seed: the seeded split when the CSV has no ``split``
            (stratified by class for single-label chips).
        **kwargs: those of :class:`ImageClassificationDataset`.
    """

    layout: ClassVar[str] = "<root>/<split>/<class>/<name>.tif, or a labels CSV"

    def __init__(self, *, root: str, split: str, labels: str = "folders",
                 images: str = "images/{name}.tif", classes: list[str] | None = None,
                 multi_label: bool = False, available_bands: list[str] | None = None,
                 bands: list[str] | None = None,
                 band_stats: dict[str, dict[str, float]] | None = None,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0,
                 **kwargs: Any) -> None:  # fmt: skip
        name = type(self).__name__
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{name}: dataset root {str(self.root)!r} does not exist; set dataset.root=<folder>"
            )
        self.multi_label = check_bool(multi_label, "dataset.multi_label")
        check_class_list(classes, name)
        table = self._label_table(labels, images, val_fraction, test_fraction, split_seed)
        known = sort_classes({c for _, _, labels_ in table.values() for c in labels_})
        # Hydra gives dataset.classes=[0,1,2] as integers; labels are text: compare as text.
        classes = [str(c).strip() for c in classes] if classes else known
        unknown = sort_classes(set(known) - set(classes))
        if unknown:
            raise ValueError(
                f"{name}: labels {unknown[:10]} are not among dataset.classes {classes}; add them "
                "or fix the labels"
            )
        warn_near_duplicates(classes, f"{name} ({self.root})")
        self._table = table
        self._classes = classes
        self._warn_missing_classes()
        sensor = kwargs.get("sensor") or "sentinel2a"
        files = [path for path, _, _ in table.values()]
        self.band_names = header_band_names(files, available_bands, sensor, name, "chip")
        self.available_bands = self.band_names.bands
        kwargs["nodata"] = declared_nodata(files, kwargs.get("nodata"), name, "chip")
        bands = list(bands) if bands else list(self.available_bands)
        if band_stats is None:
            train = sorted(p for p, s, _ in table.values() if s == "train")
            band_stats = cached_band_stats(self.root, train, self.band_names, kwargs["nodata"],
                                           name, "training chips")  # fmt: skip
        super().__init__(split=split, bands=bands, classes=classes, band_stats=band_stats,
                         multi_label=multi_label, **kwargs)  # fmt: skip
        self.names = sorted(n for n, (_, s, _) in table.items() if s == split)
        if not self.names:
            raise ValueError(
                f"{name}: split {split!r} has no chips under {str(self.root)!r} ({self.layout})"
            )

    # ---- listing --------------------------------------------------------------------------------
    def _label_table(self, labels: str, images: str, val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, tuple[Path, str, list[str]]]:  # fmt: skip
        """``name -> (image path, split, [class names])`` for every chip."""
        name = type(self).__name__
        table: dict[str, tuple[Path, str, list[str]]] = {}
        if labels == "folders":
            for split in SPLITS:
                # Rasters only: GDAL's sidecars (chip.tif.aux.xml, .ovr, .msk) are no chips.
                for path in sorted((self.root / split).glob("*/*")):
                    if path.suffix.lower() not in RASTER_SUFFIXES or not path.is_file():
                        continue
                    key = f"{split}/{path.parent.name}/{path.stem}"
                    if key in table:
                        raise ValueError(
                            f"{name}: {str(table[key][0])!r} and {str(path)!r} are one chip "
                            "twice (same name); keep one of them"
                        )
                    table[key] = (path, split, [path.parent.name.strip()])
            if not table:
                raise ValueError(
                    f"{name}: no chip matches {self.root}/<split>/<class>/<name>.tif; for a CSV "
                    "of labels set dataset.labels=<file.csv>"
                )
            return table
        path = self.root / labels
        if not path.is_file():
            raise FileNotFoundError(
                f"{name}: labels file {str(path)!r} does not exist; set dataset.labels to the CSV "
                "(columns name,label[,split]) relative to dataset.root, or to folders"
            )
        rows = read_label_csv(path, name)
        seen: dict[str, tuple[int, dict[str, str]]] = {}
        for line, row in rows:
            chip = row["name"]
            if not chip or Path(chip).is_absolute() or ".." in Path(chip).parts:
                raise ValueError(
                    f"{name}: chip name {chip!r} on line {line} of {str(path)!r} is empty, "
                    "absolute or climbs out with '..'; chips lie under dataset.root: name them "
                    f"as dataset.images ({images!r}) expects, relative to it"
                )
            if chip in seen:
                first, other = seen[chip]
                raise ValueError(
                    f"{name}: {str(path)!r} lists chip {chip!r} twice, on lines {first} "
                    f"(label {other['label']!r}, split {other.get('split') or '-'}) and {line} "
                    f"(label {row['label']!r}, split {row.get('split') or '-'}); keep one row "
                    "per chip"
                )
            seen[chip] = (line, row)
        splits = {r["name"]: r.get("split") for _, r in rows}
        parsed = {r["name"]: self._row_labels(r, line, path) for line, r in rows}
        if any(splits.values()):
            bad = sorted({s for s in splits.values() if s not in SPLITS}, key=str)
            if bad:
                raise ValueError(f"{name}: {str(path)!r} has splits {bad}; use train, val, test")
        else:
            names = sorted(splits)
            # Single-label: stratified by class, so each split holds every class in proportion.
            strata = None if self.multi_label else [parsed[n][0] for n in names]
            for split in SPLITS:
                for n in seeded_split(names, split, val_fraction, test_fraction, seed, strata):
                    splits[n] = split
        for _, row in rows:
            chip = row["name"]
            image = self.root / images.replace("{name}", chip)
            if not image.is_file():
                raise FileNotFoundError(
                    f"{name}: {str(path)!r} lists {chip!r} but {str(image)!r} does not "
                    "exist; fix dataset.images or the CSV"
                )
            table[chip] = (image, splits[chip], parsed[chip])
        empty = sorted(n for n, labels_ in parsed.items() if not labels_)
        if empty:
            log_once(log.warning, (
                f"{name} ({self.root}): {len(empty)} chip(s) have an empty label set (e.g. "
                f"{empty[0]!r}): each is scored as 'none of the labels' (a label predicted for "
                "it is a false positive); a split in which no label has a positive has no mF1, "
                "mAP or mRecall (NaN, with a warning)"
            ))  # fmt: skip
        return table

    def _row_labels(self, row: dict[str, str], line: int, path: Path) -> list[str]:
        """The class names of one CSV row (a ``;``-separated set when multi-label)."""
        name = type(self).__name__
        labels_ = [c.strip() for c in row["label"].split(";") if c.strip()]
        for label in labels_:
            if NUMBER.fullmatch(label) and not INTEGER.fullmatch(label):
                raise ValueError(
                    f"{name}: label {label!r} of chip {row['name']!r} (line {line} of "
                    f"{str(path)!r}) is a number but not an integer; a class is a whole number "
                    "(0, 1, 2, ...) or a name: fix the CSV"
                )
        if not self.multi_label and len(labels_) != 1:
            raise ValueError(
                f"{name}: {row['name']!r} has labels {labels_} in {str(path)!r} (line {line}); "
                "one class per chip, or set dataset.multi_label=true for label sets"
            )
        return labels_

    def _warn_missing_classes(self) -> None:
        """Warn once about classes without a validation or a test chip: the validation metric
        that chooses ``best.pt`` does not see them, or the test metrics leave them out."""
        counts = {s: {c: 0 for c in self._classes} for s in SPLITS}
        for _, split, labels_ in self._table.values():
            for c in labels_:
                counts[split][c] = counts[split].get(c, 0) + 1
        for split, what in (("val", "the validation metric (which chooses best.pt) never sees "
                             "them"), ("test", "the test metrics leave them out (n/a)")):  # fmt: skip
            missing = [c for c in self._classes if counts[split][c] == 0]
            if missing:
                log_once(log.warning, (
                    f"{type(self).__name__} ({self.root}): class(es) {missing} have no {split} "
                    f"chip: {what}. Add chips of them to the {split} split, or raise "
                    f"dataset.{split}_fraction when the split is seeded"
                ))  # fmt: skip

    # ---- reading --------------------------------------------------------------------------------
    def read_image(self, index: int) -> np.ndarray:
        return read_named_bands(self._table[self.names[index]][0], self.band_names, self.bands)

    def read_label(self, index: int) -> int | np.ndarray:
        labels = self._table[self.names[index]][2]
        if self.multi_label:
            hot = np.zeros(len(self._classes), dtype=np.float32)
            hot[[self._classes.index(c) for c in labels]] = 1
            return hot
        return self._classes.index(labels[0])

    def sample_name(self, index: int) -> str:
        return self.names[index].replace("/", "_")
