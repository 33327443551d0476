"""Fake data for the tests, each kind written by one function: GeoTIFFs (scenes, folder
datasets of an image and a mask per tile, classification chips), GEO-Bench v1 task folders, and
tiny MADOS, HLS Burn Scars and Sen1Floods11 in their released layouts.

The writers take parameters for what differs between tests (georeferencing, band names, the
no-data value, the layout) and return what they wrote, so a test can compare a dataset's
output with the values it wrote itself. Values that a test checks against are made by the
helpers named here (``demo_pixels``, ``mados_band``, ``hls_chip``, ...), never read back from
the code under test.

The GEO-Bench metadata pickles are made as geo-bench makes them (``str(pickle.dumps(attr_dict))``
in the HDF5 attribute ``"pickle"``; ``task_specs.pkl`` pickling ``geobench`` objects), with
stand-in classes registered under geobench's module names only while pickling: the framework
reads them without ``geobench`` installed.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import sys
import types
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

#: The demo scene's bands, as its files name them.
DEMO_BANDS = ["B2", "B3", "B4", "B8"]


def north_up(west: float, north: float, xsize: float, ysize: float):
    """A north-up affine transform, built directly: rasterio's ``from_origin`` composes it with
    Affine's deprecated ``*`` and warns on every call."""
    from affine import Affine

    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


#: Where a GeoTIFF goes unless a test says otherwise: UTM 33N at 10 m.
SCENE_CRS = "EPSG:32633"
SCENE_TRANSFORM = north_up(500000.0, 5000000.0, 10.0, 10.0)
#: The no-data value the scene helpers write (as the demo's own files declare none).
SCENE_NODATA = -9999.0


# ---- GeoTIFFs -----------------------------------------------------------------------------------
def write_tif(path: Path, data: np.ndarray, descriptions: Sequence[str] | None = None, *,
              crs: str = SCENE_CRS, transform=SCENE_TRANSFORM, georeferenced: bool = True,
              nodata: float | None = None, **profile) -> Path:  # fmt: skip
    """``data`` (C, H, W) or (H, W) as a GeoTIFF in its own dtype, its folders made; bands named
    by ``descriptions`` (from the first band on), the no-data value declared when given;
    ``georeferenced=False`` writes neither CRS nor transform (as MADOS ships); ``profile`` adds
    creation options (``compress="deflate"``)."""
    data = data[None] if data.ndim == 2 else data
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "height": data.shape[1], "width": data.shape[2],
               "count": data.shape[0], "dtype": str(data.dtype), "nodata": nodata, **profile}  # fmt: skip
    if georeferenced:
        profile.update(crs=crs, transform=transform)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
            for i, name in enumerate(descriptions or []):
                dst.set_band_description(i + 1, name)
    return path


def write_damaged_tif(path: Path, data: np.ndarray, descriptions: Sequence[str], zeroed: slice,
                      **tif) -> Path:  # fmt: skip
    """``data`` written deflate-compressed, then the bytes ``zeroed`` overwritten with zeros: the
    header still opens, the pixels cannot be read (a truncated download)."""
    write_tif(path, data, descriptions, compress="deflate", **tif)
    raw = bytearray(path.read_bytes())
    raw[zeroed] = bytes(len(raw[zeroed]))
    path.write_bytes(bytes(raw))
    return path


def write_scene(path: Path, image: np.ndarray, names: Sequence[str] | None = DEMO_BANDS) -> Path:
    """``image`` (C, H, W) as a georeferenced scene (UTM 33N, 10 m) with band ``names``."""
    return write_tif(path, image, names)


def demo_pixels(height: int, width: int, top: int = 150, left: int = 120) -> np.ndarray:
    """Real Sentinel-2 reflectance x10000 (the demo's source scene, bands B2, B3, B4, B8) as
    float32, with NaN pixels, no-data pixels, a pixel with one NaN band and an all-invalid
    corner."""
    from datasets.demo import demo_scene

    image = demo_scene()[:, top : top + height, left : left + width].astype(np.float32)
    image[:, 2:5, 3:9] = np.nan
    image[:, -3:, -4:] = SCENE_NODATA
    image[:, 9, 1:3] = SCENE_NODATA
    image[1, 12, 12] = np.nan  # one band invalid: still predicted
    return image


def write_folder_dataset(root: Path, tiles: Iterable[tuple[str, str, np.ndarray, np.ndarray]],
                         descriptions: Sequence[str] | None = None,
                         image: str = "{split}/{name}_image.tif",
                         mask: str = "{split}/{name}_mask.tif", **tif) -> Path:  # fmt: skip
    """A segmentation folder dataset: for each ``(split, name, pixels, labels)`` an image and its
    mask at the paths ``image`` and ``mask`` give (the folder dataset's default layout unless
    told), bands named by ``descriptions`` in the images only; ``tif`` goes to ``write_tif``."""
    for split, name, pixels, labels in tiles:
        write_tif(root / image.format(split=split, name=name), pixels, descriptions, **tif)
        write_tif(root / mask.format(split=split, name=name), labels, **tif)
    return root


def copy_with_band_names(source: Path, target: Path, names: tuple[str, ...]) -> Path:
    """Every GeoTIFF under ``source`` copied to ``target`` (same pixels and profile); those with
    ``len(names)`` bands get ``names`` as their band descriptions (another sensor's names for
    the same bands), the others (masks) stay as they are."""
    for path in source.rglob("*.tif"):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path) as src:
            data, profile = src.read(), src.profile
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(data)
            if len(data) == len(names):
                dst.descriptions = names
    return target


# ---- classification chips -----------------------------------------------------------------------
CHIP_BANDS = ("B2", "B3", "B4", "B8")


def write_chips(root: Path, classes: list[str], per_class: int = 3, size: int = 12,
                layout: str = "folders", seed: int = 0, multi_label: bool = False) -> Path:  # fmt: skip
    """GeoTIFF chips of 4 bands (B2, B3, B4, B8, named in the descriptions), reflectance x10000;
    class k brighter in B8 by 400 k. ``folders``: <root>/<split>/<class>/<name>.tif; ``csv``:
    images/<name>.tif and labels.csv (name,label[,split])."""
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
                write_tif(path, image, CHIP_BANDS, crs="EPSG:32631",
                          transform=north_up(500000, 5000000, 10, 10))  # fmt: skip
                label = cls
                if multi_label:
                    label = ";".join(sorted({cls, classes[(k + 1) % len(classes)]}))
                rows.append(f"{name},{label},{split}")
    if layout == "csv":
        (root / "labels.csv").write_text("name,label,split\n" + "\n".join(rows) + "\n")
    return root


def write_reflectance_chip(path: Path, k: int = 0, size: int = 4, empty: bool = False,
                           seed: int = 0) -> Path:  # fmt: skip
    """A float32 reflectance chip of the 4 named ``CHIP_BANDS``, not georeferenced (class k
    brighter in B8); ``empty``: every pixel NaN (no valid pixel)."""
    rng = np.random.default_rng(seed)
    image = rng.normal([[[0.08]], [[0.09]], [[0.10]], [[0.20 + 0.04 * k]]], 0.006,
                       (4, size, size)).astype(np.float32)  # fmt: skip
    if empty:
        image[:] = np.nan
    return write_tif(path, image, CHIP_BANDS, georeferenced=False)


# ---- GEO-Bench v1 -------------------------------------------------------------------------------
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
                        attrs["evil"] = Evil()
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


class Evil:
    """Pickles to a call of os.system: never to be run."""

    marker: Path | None = None

    def __reduce__(self):
        import os

        return (os.system, (f"touch {Evil.marker}",))


# ---- MADOS --------------------------------------------------------------------------------------
MADOS_10M = 24  # the fixture's 10 m crops (240 in the release); 20 m: 12, 60 m: 4
MADOS_SIZES = {"10": MADOS_10M, "20": MADOS_10M // 2, "60": MADOS_10M // 6}
#: S2A and S2B name bands by slightly different wavelengths; the fixture uses both.
MADOS_WAVELENGTHS = {
    "S2A": {"B1": 443, "B2": 492, "B3": 560, "B4": 665, "B5": 704, "B6": 740, "B7": 783,
            "B8": 833, "B8A": 865, "B11": 1614, "B12": 2202},
    "S2B": {"B1": 442, "B2": 492, "B3": 559, "B4": 665, "B5": 704, "B6": 739, "B7": 780,
            "B8": 833, "B8A": 864, "B11": 1610, "B12": 2186},
}  # fmt: skip


def mados_band(scene: int, crop: int, band: str) -> np.ndarray:
    """The values the fixture writes for one band file: distinct per scene, crop, band, pixel."""
    from datasets.mados import MADOS_BANDS

    size = MADOS_SIZES[MADOS_BANDS[band][0]]
    base = 0.01 * scene + 0.001 * crop + 0.0001 * list(MADOS_BANDS).index(band)
    return (base + 1e-6 * np.arange(size * size).reshape(size, size)).astype(np.float32)


def mados_mask(scene: int, crop: int) -> np.ndarray:
    """The labels the fixture writes for one crop (0 = unlabelled, as MADOS stores them)."""
    rng = np.random.default_rng(scene * 10 + crop)
    return rng.integers(0, 16, (MADOS_10M, MADOS_10M)).astype(np.uint8)


def write_mados(root: Path) -> Path:
    """A tiny MADOS in its released layout under ``root`` (not georeferenced, as released)."""
    from datasets.mados import MADOS_BANDS

    crops = {"train": [(0, 1), (0, 2), (1, 1)], "val": [(1, 2)], "test": [(0, 3)]}
    for split, ids in crops.items():
        (root / "splits").mkdir(parents=True, exist_ok=True)
        (root / "splits" / f"{split}_X.txt").write_text("".join(f"Scene_{s}_{c}\n" for s, c in ids))
    for ids in crops.values():
        for scene, crop in ids:
            sensor = "S2A" if scene == 0 else "S2B"
            folder = root / f"Scene_{scene}"
            for band, (res, _, _) in MADOS_BANDS.items():
                nm = MADOS_WAVELENGTHS[sensor][band]
                name = f"Scene_{scene}_L2R_rhorc_{nm}_{crop}.tif"
                write_tif(folder / res / name, mados_band(scene, crop, band), georeferenced=False)
            mask = mados_mask(scene, crop)
            cl = folder / "10" / f"Scene_{scene}_L2R_cl_{crop}.tif"
            write_tif(cl, mask, georeferenced=False)
            for extra in ("conf", "rep"):  # released next to the mask; must be ignored
                extra_path = folder / "10" / f"Scene_{scene}_L2R_{extra}_{crop}.tif"
                write_tif(extra_path, mask, georeferenced=False)
    # A crop on disk that no split lists: not loaded.
    unlisted = root / "Scene_1" / "10" / "Scene_1_L2R_cl_9.tif"
    write_tif(unlisted, mados_mask(1, 9), georeferenced=False)
    return root


# ---- HLS Burn Scars -----------------------------------------------------------------------------
HLS = 16  # chip size in the fixture (512 in the release)
#: The benchmark fixtures' georeferencing (HLS Burn Scars, Sen1Floods11): UTM 33N at 30 m.
UTM33N_30M = north_up(500000, 4000000, 30, 30)


def hls_name(i: int) -> str:
    return f"subsetted_512x512_HLS.S30.T10SEH.2018{i:03d}.v1.4"


def hls_chip(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Chip ``i`` as the fixture stores it: 6 bands in [0, 0.4) with 9999 (no data) in every
    band at (0, 0) and in B4 at (1, 1); labels 0/1 with -1 (missing) in the first 4 pixels."""
    rng = np.random.default_rng(i)
    image = rng.uniform(0, 0.4, (6, HLS, HLS)).astype(np.float32)
    image[:, 0, 0] = 9999  # no data in every band
    image[2, 1, 1] = 9999  # no data in B4 only
    mask = rng.integers(0, 2, (HLS, HLS)).astype(np.int16)
    mask[0, :4] = -1  # missing labels
    return image, mask


def write_hls(root: Path) -> Path:
    """A tiny HLS Burn Scars in its released layout under ``root``."""
    for folder, ids in (("training", range(10)), ("validation", range(100, 103))):
        for i in ids:
            image, mask = hls_chip(i)
            write_tif(root / folder / f"{hls_name(i)}_merged.tif", image, transform=UTM33N_30M)
            write_tif(root / folder / f"{hls_name(i)}.mask.tif", mask, transform=UTM33N_30M)
    return root


# ---- Sen1Floods11 -------------------------------------------------------------------------------
S1F = 16
FLOOD_CHIPS = {"train": ["Bolivia_103757", "Ghana_5079"], "val": ["India_1068"],
               "test": ["USA_181263"]}  # fmt: skip


def flood_chip(split: str, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chip ``k`` of ``split`` as the fixture stores it: 13 optical bands (uint16), VV and VH
    (float32, NaN at (2, 3)), labels -1/0/1."""
    rng = np.random.default_rng(len(FLOOD_CHIPS[split][k]) + k)
    optical = rng.integers(0, 10000, (13, S1F, S1F)).astype(np.uint16)
    sar = rng.normal(-12, 4, (2, S1F, S1F)).astype(np.float32)
    sar[:, 2, 3] = np.nan
    label = rng.integers(-1, 2, (S1F, S1F)).astype(np.int16)
    return optical, sar, label


def write_floods(root: Path) -> Path:
    """A tiny Sen1Floods11 (hand-labelled v1.1) in its released layout under ``root``."""
    splits = root / "v1.1" / "splits" / "flood_handlabeled"
    splits.mkdir(parents=True)
    names = {"train": "flood_train_data.csv", "val": "flood_valid_data.csv",
             "test": "flood_test_data.csv"}  # fmt: skip
    hand = root / "v1.1" / "data" / "flood_events" / "HandLabeled"
    for split, chips in FLOOD_CHIPS.items():
        (splits / names[split]).write_text(
            "".join(f"{c}_S1Hand.tif,{c}_LabelHand.tif\n" for c in chips)
        )
        for k, chip in enumerate(chips):
            optical, sar, label = flood_chip(split, k)
            write_tif(hand / "S2Hand" / f"{chip}_S2Hand.tif", optical, transform=UTM33N_30M)
            write_tif(hand / "S1Hand" / f"{chip}_S1Hand.tif", sar, transform=UTM33N_30M)
            write_tif(hand / "LabelHand" / f"{chip}_LabelHand.tif", label,
                      transform=UTM33N_30M)  # fmt: skip
    return root
