"""Tiny GEO-Bench v1 task folders and image chips, written in the released layouts.

The metadata pickles are made as geo-bench makes them (``str(pickle.dumps(attr_dict))`` in
the HDF5 attribute ``"pickle"``; ``task_specs.pkl`` pickling ``geobench`` objects), with
stand-in classes registered under geobench's module names only while pickling: the framework
reads them without ``geobench`` installed.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np

S2_CHANNELS = ["02 - Blue", "03 - Green", "04 - Red", "05 - Vegetation Red Edge",
               "06 - Vegetation Red Edge", "07 - Vegetation Red Edge", "08 - NIR",
               "08A - Vegetation Red Edge", "11 - SWIR", "12 - SWIR"]  # fmt: skip


@contextlib.contextmanager
def geobench_modules():
    """Stand-ins of geobench's classes, importable by their names for pickling only."""
    names = {"geobench.task": ["TaskSpecifications"], "geobench.dataset": ["Sentinel2",
             "SpectralBand"], "geobench.label": ["Classification", "MultiLabelClassification"]}  # fmt: skip
    added = []
    root = types.ModuleType("geobench")
    sys.modules["geobench"] = root
    added.append("geobench")
    classes = {}
    for module_name, class_names in names.items():
        module = types.ModuleType(module_name)
        for class_name in class_names:
            cls = type(class_name, (), {"__module__": module_name})
            setattr(module, class_name, cls)
            classes[class_name] = cls
        sys.modules[module_name] = module
        added.append(module_name)
    try:
        yield classes
    finally:
        for name in added:
            sys.modules.pop(name, None)


def write_geobench(root: Path, classes: list[str], sizes: dict[str, int], size: int = 16,
                   multi_label: bool = False, channels: list[str] = S2_CHANNELS,
                   seed: int = 0, hostile_sample: str | None = None, scale: float = 10000,
                   date: str | None = None) -> Path:  # fmt: skip
    """A task folder: task_specs.pkl, partitions (default and 0.50x_train), band_stats.json and
    one HDF5 per sample (int16 reflectance x10000, or float32 at another ``scale``; channel
    names with ``_<date>`` when given, as m-forestnet's); class k's images are brighter in the
    NIR channel (the 7th, "08 - NIR" for Sentinel-2) by 400 k (x10000)."""
    import h5py

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    partition: dict[str, list[str]] = {}
    pixels: dict[str, list[np.ndarray]] = {c: [] for c in channels}
    labels = {}
    with geobench_modules() as gb:
        for split, n in sizes.items():
            partition[split] = []
            for i in range(n):
                name = f"id_{split}_{i:03d}"
                if multi_label:
                    label = (rng.random(len(classes)) < 0.4).astype(np.int64)
                    k = int(label.argmax())
                else:
                    label = int(rng.integers(len(classes)))
                    k = label
                labels[name] = label
                band_meta = {}
                with h5py.File(root / f"{name}.hdf5", "w") as f:
                    for j, channel in enumerate(channels):
                        base = 800 + 150 * j + (400 * k if j == min(6, len(channels) - 1) else 0)
                        data = rng.normal(base, 60, (size, size))
                        data = (data.astype(np.int16) if scale == 10000
                                else (data * scale / 10000).astype(np.float32))  # fmt: skip
                        f.create_dataset(channel + (f"_{date}" if date else ""), data=data)
                        pixels[channel].append(data.astype(np.float64))
                        band = gb["SpectralBand"]()
                        band.__dict__.update(name=channel, alt_names=(), spatial_resolution=10,
                                             wavelength=0.5)  # fmt: skip
                        band_meta[channel] = {"date": None, "date_id": None,
                                              "spatial_resolution": 10, "band_info": band,
                                              "meta_info": None, "transform": None, "crs": None}  # fmt: skip
                    attrs = {"label": np.asarray(label) if multi_label else label,
                             "bands_order": list(channels), **band_meta}  # fmt: skip
                    if name == hostile_sample:
                        attrs["evil"] = _Evil()
                    f.attrs["pickle"] = str(pickle.dumps(attrs, protocol=4))
                partition[split].append(name)
        label_type = gb["MultiLabelClassification" if multi_label else "Classification"]()
        if multi_label:
            label_type.__dict__.update(n_classes=len(classes), class_name=list(classes))
        else:
            label_type.__dict__.update(n_classes=len(classes), _class_names=list(classes))
        specs = gb["TaskSpecifications"]()
        specs.__dict__.update(dataset_name=root.name, benchmark_name="classification_v1.0",
                              patch_size=(size, size), n_time_steps=1, bands_info=[],
                              label_type=label_type, spatial_resolution=10)  # fmt: skip
        (root / "task_specs.pkl").write_bytes(pickle.dumps(specs, protocol=4))
    (root / "default_partition.json").write_text(json.dumps(partition))
    half = {**partition, "train": partition["train"][: max(1, len(partition["train"]) // 2)]}
    (root / "0.50x_train_partition.json").write_text(json.dumps(half))
    stats = {c: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": 0.0, "max": 1.0}
             for c, v in pixels.items()}  # fmt: skip
    (root / "band_stats.json").write_text(json.dumps(stats))
    (root / "label_stats.json").write_text(json.dumps(
        {n: (list(map(int, v)) if multi_label else [int(i == v) for i in range(len(classes))])
         for n, v in labels.items()}))  # fmt: skip
    return root


class _Evil:
    """Pickles to a call of os.system: never to be run."""

    marker: Path | None = None

    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Evil.marker}",))


def write_chips(root: Path, classes: list[str], per_class: int = 3, size: int = 12,
                layout: str = "folders", seed: int = 0, multi_label: bool = False) -> Path:  # fmt: skip
    """GeoTIFF chips of 4 bands (B2, B3, B4, B8, named in the descriptions), reflectance x10000;
    class k brighter in B8 by 400 k. ``folders``: <root>/<split>/<class>/<name>.tif; ``csv``:
    images/<name>.tif and labels.csv (name,label[,split])."""
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(seed)
    rows = []
    for split, n in (("train", per_class), ("val", 1), ("test", 1)):
        for k, cls in enumerate(classes):
            for i in range(n):
                image = rng.normal([[[800]], [[900]], [[1000]], [[2000 + 400 * k]]], 60,
                                   (4, size, size)).astype(np.uint16)  # fmt: skip
                name = f"{cls}_{split}_{i}"
                path = (root / split / cls / f"{name}.tif" if layout == "folders"
                        else root / "images" / f"{name}.tif")  # fmt: skip
                path.parent.mkdir(parents=True, exist_ok=True)
                profile = {"driver": "GTiff", "height": size, "width": size, "count": 4,
                           "dtype": "uint16", "crs": "EPSG:32631",
                           "transform": Affine(10, 0, 500000, 0, -10, 5000000)}  # fmt: skip
                with rasterio.open(path, "w", **profile) as dst:
                    dst.write(image)
                    dst.descriptions = ("B2", "B3", "B4", "B8")
                label = cls
                if multi_label:
                    label = ";".join(sorted({cls, classes[(k + 1) % len(classes)]}))
                rows.append(f"{name},{label},{split}")
    if layout == "csv":
        (root / "labels.csv").write_text("name,label,split\n" + "\n".join(rows) + "\n")
    return root
