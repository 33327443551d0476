"""GEO-Bench v1 classification tasks, read from the released files as they are.

``dataset.root`` is one task folder of the release (``classification_v1.0/<task>/``)::

    task_specs.pkl                     the task (bands, classes): a pickle, read safely
    default_partition.json             {"train": [names], "valid": [names], "test": [names]}
    <p>_partition.json                 other partitions, e.g. 0.10x_train (few-shot training)
    band_stats.json                    {band name: {mean, std, min, max, ...}}
    <name>.hdf5                        one 2-D dataset per band, named by the band ("02 - Blue";
                                       m-forestnet adds "_<date>"); the file attribute "pickle"
                                       holds the sample's metadata, its "label" among it

No pickle is ever run: ``task_specs.pkl`` and each sample's metadata go through
:func:`datasets.safe_pickle.safe_loads` (plain data only; geobench's classes become inert
records; ``geobench`` need not be installed). A hostile pickle is refused, naming the file.

**Bands.** Each task's YAML maps the stored channel names to the framework's band codes
(``channels``). For m-eurosat and m-brick-kiln the release names most channels wrongly (the
pixel data is right; geo-bench issues #28 and #29): there the mapping follows the channels'
true content, by position, not their stored names (m-eurosat's "08A" channel is B9, its "12"
channel B8A; m-brick-kiln's "06" is B7, "07" B8A, "08" B8, "08A" B11, "09" B12, and its last
three channels are an 8-bit true-colour rendering). Statistics come from ``band_stats.json``,
keyed by the stored names, so they follow the same mapping.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from datasets.classification import ImageClassificationDataset, check_class_list
from datasets.safe_pickle import safe_loads

log = logging.getLogger(__name__)

#: Sample files whose label and band sizes were checked: (path, size, mtime, channels, classes,
#: multi-label).
_CHECKED: set[tuple] = set()

#: The splits of the framework and their names in GEO-Bench's partitions.
PARTITION_SPLITS = {"train": "train", "val": "valid", "test": "test"}


def read_task_specs(root: Path) -> Any:
    """``task_specs.pkl`` of a task folder, as inert records (never run)."""
    path = root / "task_specs.pkl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist; dataset.root must be a GEO-Bench task folder "
            "(classification_v1.0/<task>/, holding task_specs.pkl and the .hdf5 samples)"
        )
    return safe_loads(path.read_bytes(), str(path))


def class_names_of(specs: Any) -> list[str] | None:
    """The class names a task's specifications give (single- or multi-label), if any."""
    label = getattr(specs, "label_type", None)
    for attribute in ("_class_names", "class_names", "class_name"):
        names = getattr(label, attribute, None)
        if isinstance(names, (list, tuple)) and names:
            return [str(n) for n in names]
    return None


class GeoBench(ImageClassificationDataset):
    """One GEO-Bench v1 classification task (see the module docstring).

    Args:
        root: the task folder.
        split: ``train``, ``val`` (GEO-Bench's ``valid``) or ``test``.
        channels: stored channel name -> band code (the YAML of each task gives it).
        bands: the bands to load, by code (default: every mapped band).
        classes: class names; default: those of ``task_specs.pkl``.
        partition: ``default`` or another ``<partition>_partition.json`` (e.g. ``0.10x_train``).
        band_stats: default: ``band_stats.json`` through ``channels``.
        **kwargs: those of :class:`~datasets.classification.ImageClassificationDataset`
            (``multi_label``, ``reflectance_scale``, ``sensor``, ...).
    """

    layout: ClassVar[str] = "classification_v1.0/<task>/ of the GEO-Bench v1 release"

    def __init__(self, *, root: str, split: str, channels: dict[str, str],
                 bands: list[str] | None = None, classes: list[str] | None = None,
                 partition: str = "default",
                 band_stats: dict[str, dict[str, float]] | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        name = type(self).__name__
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{name}: dataset root {str(self.root)!r} does not exist; set dataset.root to the "
                "GEO-Bench task folder (classification_v1.0/<task>/)"
            )
        specs = read_task_specs(self.root)
        self.channels = {str(k): str(v) for k, v in channels.items()}
        self.code_to_channel = {v: k for k, v in self.channels.items()}
        bands = list(bands) if bands else list(self.channels.values())
        missing = [b for b in bands if b not in self.code_to_channel]
        if missing:
            raise ValueError(
                f"{name}: bands {missing} are not among this task's channels "
                f"{list(self.code_to_channel)}; fix dataset.bands"
            )
        found = class_names_of(specs)
        check_class_list(classes, name)
        if classes is not None:
            classes = [str(c).strip() for c in classes]
        if classes is None:
            if found is None:
                raise ValueError(f"{name}: task_specs.pkl names no classes; give dataset.classes")
            classes = found
        elif found is not None and len(found) != len(classes):
            raise ValueError(
                f"{name}: dataset.classes lists {len(classes)} classes, task_specs.pkl {len(found)}"
            )
        if band_stats is None:
            band_stats = self._band_stats(bands)
        super().__init__(split=split, bands=bands, classes=list(classes), band_stats=band_stats,
                         **kwargs)  # fmt: skip
        self.partition = partition
        self.names = self._partition_names(partition, split)
        self._check_samples()

    def _partition_names(self, partition: str, split: str) -> list[str]:
        name = type(self).__name__
        path = self.root / f"{partition}_partition.json"
        if not path.is_file():
            found = sorted(p.name[: -len("_partition.json")]
                           for p in self.root.glob("*_partition.json"))  # fmt: skip
            raise FileNotFoundError(
                f"{name}: partition {str(path)!r} does not exist; dataset.partition is one of {found}"
            )
        try:
            table = json.loads(path.read_text())
            names = [str(n) for n in table[PARTITION_SPLITS[split]]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{name}: {str(path)!r} is not a partition ({{train, valid, test}} lists): {err}"
            ) from err
        if not names:
            raise ValueError(f"{name}: {str(path)!r} lists no {PARTITION_SPLITS[split]} sample")
        missing = [n for n in names if not (self.root / f"{n}.hdf5").is_file()]
        if missing:
            raise FileNotFoundError(
                f"{name}: {len(missing)} sample(s) of {str(path)!r} are missing, e.g. "
                f"{str(self.root / (missing[0] + '.hdf5'))!r}; is the task fully unpacked?"
            )
        return names

    def _band_stats(self, bands: list[str]) -> dict[str, dict[str, float]]:
        path = self.root / "band_stats.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} does not exist; give dataset.band_stats or restore the file"
            )
        table = json.loads(path.read_text())
        out: dict[str, dict[str, float]] = {"mean": {}, "std": {}}
        for band in bands:
            channel = self.code_to_channel[band]
            if channel not in table:
                raise ValueError(f"{str(path)!r} has no statistics for channel {channel!r}")
            out["mean"][band] = float(table[channel]["mean"])
            out["std"][band] = float(table[channel]["std"])
        return out

    def _open(self, index: int):
        import h5py

        path = self.root / f"{self.names[index]}.hdf5"
        try:
            return h5py.File(path, "r"), path
        except OSError as err:
            raise OSError(
                f"cannot read {str(path)!r} (not an HDF5 file, or damaged): {err}; re-download "
                "or re-extract the task"
            ) from err

    def _dataset_name(self, handle, channel: str, path: Path) -> str:
        if channel in handle:
            return channel
        dated = [k for k in handle if k.startswith(channel + "_")]  # m-forestnet: "<name>_<date>"
        if len(dated) == 1:
            return dated[0]
        raise ValueError(f"{str(path)!r} has no channel {channel!r} (it has {sorted(handle)})")

    def read_image(self, index: int) -> np.ndarray:
        handle, path = self._open(index)
        with handle:
            channels = [self.code_to_channel[b] for b in self.bands]
            return np.stack([np.asarray(handle[self._dataset_name(handle, c, path)])
                             for c in channels])  # fmt: skip  # (C, H, W)

    def read_label(self, index: int) -> int | np.ndarray:
        handle, path = self._open(index)
        with handle:
            return self._label(handle, path)

    def _label(self, handle, path: Path) -> int | np.ndarray:
        """The sample's class id (or multi-hot label set), checked against the classes."""
        if "pickle" not in handle.attrs:
            raise ValueError(f"{str(path)!r} has no 'pickle' attribute holding its label")
        metadata = safe_loads(handle.attrs["pickle"], str(path))
        if not isinstance(metadata, dict) or "label" not in metadata:
            raise ValueError(f"{str(path)!r}: the sample's metadata has no label")
        label = np.asarray(metadata["label"])
        k = self.num_classes
        if self.multi_label:
            if (
                label.dtype.kind not in "biuf"
                or label.size != k
                or not np.isin(label, (0, 1)).all()
            ):
                raise ValueError(
                    f"{str(path)!r}: the label {metadata['label']!r} is not a set of {k} 0/1 "
                    f"values, one per label of {self.classes[:5]}...; the file is damaged or "
                    "from another task (check dataset.root and dataset.classes)"
                )
            return label.astype(np.float32).reshape(-1)
        value = label.reshape(()).item() if label.size == 1 else None
        integer = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())  # fmt: skip
        if not integer or not 0 <= int(value) < k:
            raise ValueError(
                f"{str(path)!r}: the label {metadata['label']!r} is not a class id 0..{k - 1} "
                f"of the {k} classes {self.classes[:5]}{'...' if k > 5 else ''}; the file is "
                "damaged or from another task (check dataset.root and dataset.classes)"
            )
        return int(value)

    def _check_samples(self) -> None:
        """Every sample of the split, before training: its label (see :meth:`_label`) and its
        bands' sizes (all loaded bands stored at one size), read from the headers and metadata
        only (no pixels), so a bad file is named now, not after training. A file checked
        unchanged with the same bands and classes is not read again in this process (a sweep)."""
        channels = [self.code_to_channel[b] for b in self.bands]
        start = time.time()
        for index, sample in enumerate(self.names):
            path = self.root / f"{sample}.hdf5"
            stat = path.stat()
            key = (path, stat.st_size, stat.st_mtime_ns, tuple(channels), tuple(self.classes),
                   self.multi_label)  # fmt: skip
            if key in _CHECKED:
                continue
            handle, path = self._open(index)
            with handle:
                self._label(handle, path)
                shapes = {c: handle[self._dataset_name(handle, c, path)].shape for c in channels}
            if len(set(shapes.values())) > 1:
                common = max(set(shapes.values()), key=list(shapes.values()).count)
                odd = {c: s for c, s in shapes.items() if s != common}
                raise ValueError(
                    f"{str(path)!r}: bands stored at other sizes: {odd} while the others are "
                    f"{common}; every band of a sample must have one size (the file is damaged: "
                    "re-download the task)"
                )
            _CHECKED.add(key)
        if time.time() - start > 5:
            log.info("%s (%s): checked the labels and band sizes of %d samples in %.0f s",
                     type(self).__name__, self.split, len(self.names), time.time() - start)  # fmt: skip
