"""Tests of the datasets package: GeoTIFF reading, joint transforms and the demo dataset.

Values are checked against independent oracles: arrays written by the test with rasterio,
numpy re-implementations of normalisation and NDVI labelling, and the raw spyndex sample.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import spyndex
import torch
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

from datasets import (
    DEMO_BAND_STATS,
    DEMO_CLASSES,
    DemoVegetation,
    FolderSegmentation,
    JointTransform,
    build_transform,
    prepare_demo,
)
from datasets import demo as demo_module
from deflect.data import DataSpec

BANDS = ["B2", "B3", "B4", "B8"]
STATS = {
    "mean": {"B2": 1.0, "B3": 2.0, "B4": 3.0, "B8": 4.0},
    "std": {"B2": 0.5, "B3": 1.5, "B4": 2.5, "B8": 3.5},
}
NODATA = -9999.0
CRS_STR = "EPSG:32633"
TRANSFORM = Affine(20.0, 0.0, 300000.0, 0.0, -20.0, 6000000.0)


class TinyFolder(FolderSegmentation):
    """A folder dataset with a declared no-data value, as HLS Burn Scars has."""

    available_bands = BANDS
    nodata = NODATA


class SensorFolder(TinyFolder):
    """A folder dataset declaring its own sensor and ground sample distance."""

    sensor = "landsat8"
    gsd = 30.0


class OffsetFolder(TinyFolder):
    """A folder dataset whose stored 0 means unlabelled, as MADOS has."""

    label_offset = 1
    georeferenced = False


def write_tif(path: Path, array: np.ndarray, georeferenced: bool = True) -> None:
    """Write ``array`` (C, H, W) as a GeoTIFF."""
    profile = {
        "driver": "GTiff",
        "count": array.shape[0],
        "height": array.shape[1],
        "width": array.shape[2],
        "dtype": array.dtype.name,
    }
    if georeferenced:
        profile.update(crs=CRS_STR, transform=TRANSFORM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(array)


def dataset_kwargs(root: Path, **overrides) -> dict:
    kwargs = {
        "root": str(root),
        "split": "train",
        "bands": ["B8", "B2", "B4"],
        "classes": ["a", "b", "c"],
        "band_stats": STATS,
        "ignore_index": -1,
    }
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """One train sample: float32 image (4, 6, 7) with a NaN and a no-data pixel, int16 mask."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1000, size=(4, 6, 7)).astype(np.float32)
    image[2, 1, 3] = np.nan  # B4
    image[0, 4, 5] = NODATA  # B2
    mask = rng.integers(0, 3, size=(1, 6, 7)).astype(np.int16)
    mask[0, 0, 0] = 5  # out of range for 3 classes
    mask[0, 2, 2] = -1
    mask[0, 5, 6] = 3
    (tmp_path / "train").mkdir()
    write_tif(tmp_path / "train" / "s1_image.tif", image)
    write_tif(tmp_path / "train" / "s1_mask.tif", mask)
    return tmp_path, image, mask[0]


# --------------------------------------------------------------------------- base reading


def test_folder_reads_bands_by_name_with_nan_nodata_and_ignore(folder):
    root, image, mask = folder
    ds = TinyFolder(**dataset_kwargs(root))
    assert len(ds) == 1 and ds.sample_name(0) == "s1" and ds.num_classes == 3

    sample = ds[0]
    assert set(sample) == {"image", "mask", "index"} and sample["index"] == 0
    assert sample["image"].dtype == torch.float32 and sample["mask"].dtype == torch.int64

    out = sample["image"].numpy()
    file_values = image[[3, 0, 2]]  # B8, B2, B4
    invalid = np.isnan(file_values) | (file_values == np.float32(NODATA))
    assert invalid.sum() == 2  # the fixture's NaN (B4) and no-data (B2) pixels
    np.testing.assert_array_equal(np.isnan(out), invalid)  # NaN exactly there
    np.testing.assert_array_equal(out[~invalid], file_values[~invalid])
    assert np.isnan(out[2, 1, 3]) and np.isnan(out[1, 4, 5])

    expected_mask = np.where((mask >= 0) & (mask < 3), mask, -1)
    np.testing.assert_array_equal(sample["mask"].numpy(), expected_mask)
    assert sample["mask"][0, 0] == -1 and sample["mask"][5, 6] == -1

    assert ds.spec.mean_list() == [4.0, 1.0, 3.0] and ds.spec.std_list() == [3.5, 0.5, 2.5]
    assert ds.spec.mean == {"B8": 4.0, "B2": 1.0, "B4": 3.0}
    assert ds.bands == ["B8", "B2", "B4"] and ds.classes == ["a", "b", "c"]
    assert ds.ignore_index == -1 and ds.spec.nodata == NODATA


def test_constructor_overrides_nodata_sensor_gsd_and_display_bands(folder):
    root, image, _ = folder
    ds = SensorFolder(**dataset_kwargs(root))  # class defaults
    assert (ds.spec.nodata, ds.spec.sensor, ds.spec.gsd) == (NODATA, "landsat8", 30.0)
    # B4, B3, B2 are not all loaded: the first three bands are displayed.
    assert ds.spec.display_bands == ("B8", "B2", "B4")
    base = TinyFolder(**dataset_kwargs(root))
    assert (base.spec.sensor, base.spec.gsd) == ("sentinel2a", None)

    new_nodata = float(image[3, 2, 4])  # a value present in the file (B8), exact in float32
    ds = SensorFolder(
        **dataset_kwargs(root),
        nodata=new_nodata,
        sensor="sentinel2b",
        gsd=20,
        display_bands=["B4", "B2", "B8"],
    )
    assert ds.spec.nodata == new_nodata and ds.spec.sensor == "sentinel2b"
    assert ds.spec.gsd == 20.0 and ds.spec.display_bands == ("B4", "B2", "B8")
    assert SensorFolder.nodata == NODATA and SensorFolder.gsd == 30.0  # class left alone

    # The overriding no-data value is invalid; the class's -9999 is now an ordinary value.
    out = ds[0]["image"].numpy()
    file_values = image[[3, 0, 2]]
    invalid = np.isnan(file_values) | (file_values == np.float32(new_nodata))
    assert invalid[0, 2, 4] and not invalid[1, 4, 5]
    np.testing.assert_array_equal(np.isnan(out), invalid)
    np.testing.assert_array_equal(out[~invalid], file_values[~invalid])
    assert out[1, 4, 5] == NODATA

    with pytest.raises(ValueError, match=r"SensorFolder: display_bands .*\['B3'\] are not"):
        SensorFolder(**dataset_kwargs(root), display_bands=["B4", "B3", "B2"])


def test_label_offset_and_custom_ignore_index(folder):
    root, _, mask = folder
    ds = OffsetFolder(**dataset_kwargs(root, ignore_index=255))
    shifted = mask.astype(np.int64) - 1
    expected = np.where((shifted >= 0) & (shifted < 3), shifted, 255)
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), expected)


def test_georeference_and_not_georeferenced_warning(folder, tmp_path):
    root, image, mask = folder
    crs, transform = TinyFolder(**dataset_kwargs(root)).georeference(0)
    assert crs.to_string() == CRS_STR and transform == TRANSFORM

    plain = tmp_path / "plain"
    (plain / "train").mkdir(parents=True)
    write_tif(plain / "train" / "x_image.tif", image, georeferenced=False)
    write_tif(plain / "train" / "x_mask.tif", mask[None], georeferenced=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = OffsetFolder(**dataset_kwargs(plain))  # georeferenced = False: silenced
        ds[0]
        assert ds.georeference(0)[0] is None
    assert not [w for w in caught if issubclass(w.category, NotGeoreferencedWarning)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TinyFolder(**dataset_kwargs(plain))[0]  # georeferenced = True: warned
    assert [w for w in caught if issubclass(w.category, NotGeoreferencedWarning)]


def test_folder_dataset_with_available_bands_from_config(folder):
    root, image, _ = folder
    ds = FolderSegmentation(available_bands=BANDS, **dataset_kwargs(root, bands=["B3"]))
    np.testing.assert_array_equal(ds[0]["image"].numpy(), image[[1]])
    # No no-data value declared: -9999 is a value like any other; only NaN is invalid.
    ds = FolderSegmentation(available_bands=BANDS, **dataset_kwargs(root, bands=["B2", "B4"]))
    assert ds.spec.nodata is None
    out = ds[0]["image"].numpy()
    assert out[0, 4, 5] == NODATA
    np.testing.assert_array_equal(np.isnan(out), np.isnan(image[[0, 2]]))


def test_dataset_applies_joint_transform(folder):
    root, _, _ = folder
    raw_ds = TinyFolder(**dataset_kwargs(root))
    transform = build_transform(raw_ds.spec, train=False, crop_size=None)
    raw = raw_ds[0]["image"].numpy()
    out = TinyFolder(**dataset_kwargs(root, transform=transform))[0]["image"].numpy()
    mean, std = np.array([4.0, 1.0, 3.0]), np.array([3.5, 0.5, 2.5])
    expected = (raw - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_array_equal(np.isnan(out), np.isnan(raw))  # NaN survives normalisation
    assert np.isnan(raw).sum() == 2
    np.testing.assert_allclose(out, expected, rtol=1e-6)


# ----------------------------------------------------------------------- base validation


def test_missing_root_names_path_and_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*dataset\.root="):
        TinyFolder(**dataset_kwargs(missing))


def test_unavailable_band_lists_available(folder):
    with pytest.raises(ValueError, match=r"'B5'.*\['B2', 'B3', 'B4', 'B8'\]"):
        TinyFolder(**dataset_kwargs(folder[0], bands=["B2", "B5"]))


def test_duplicated_band_is_an_error(folder):
    with pytest.raises(ValueError, match=r"TinyFolder: bands .*same band twice: \['B2'\]"):
        TinyFolder(**dataset_kwargs(folder[0], bands=["B2", "B4", "B2"]))


def test_band_stats_missing_band(folder):
    stats = {"mean": STATS["mean"], "std": {"B2": 1.0, "B8": 1.0}}
    with pytest.raises(ValueError, match=r"TinyFolder: band std lacks bands \['B4'\]"):
        TinyFolder(**dataset_kwargs(folder[0], band_stats=stats))
    with pytest.raises(ValueError, match=r"TinyFolder: band_stats has no 'mean'"):
        TinyFolder(**dataset_kwargs(folder[0], band_stats={"std": STATS["std"]}))
    zero = {"mean": STATS["mean"], "std": {**STATS["std"], "B4": 0.0}}
    with pytest.raises(ValueError, match=r"TinyFolder: band std must be > 0.*'B4': 0\.0"):
        TinyFolder(**dataset_kwargs(folder[0], band_stats=zero))
    nan_mean = {"mean": {**STATS["mean"], "B2": float("nan")}, "std": STATS["std"]}
    with pytest.raises(ValueError, match=r"TinyFolder: band mean is not finite.*'B2': nan"):
        TinyFolder(**dataset_kwargs(folder[0], band_stats=nan_mean))


def test_bad_split(folder):
    with pytest.raises(ValueError, match=r"'training'.*\['train', 'val', 'test'\]"):
        TinyFolder(**dataset_kwargs(folder[0], split="training"))


def test_empty_split(folder):
    (folder[0] / "val").mkdir()
    with pytest.raises(ValueError, match=r"split 'val' has no samples.*_image\.tif"):
        TinyFolder(**dataset_kwargs(folder[0], split="val"))


def test_unknown_config_key_is_an_error(folder):
    with pytest.raises(TypeError, match="num_workers"):
        TinyFolder(**dataset_kwargs(folder[0], num_workers=2))
    for removed in ("img_size", "spectral_indices"):  # no longer dataset arguments
        with pytest.raises(TypeError, match=removed):
            TinyFolder(**dataset_kwargs(folder[0], **{removed: 8}))


def test_ignore_index_inside_class_range(folder):
    with pytest.raises(ValueError, match=r"TinyFolder: ignore_index=1 .*'b'"):
        TinyFolder(**dataset_kwargs(folder[0], ignore_index=1))


def test_corrupt_geotiff_names_the_file(folder):
    root = folder[0]
    bad = root / "train" / "s2_image.tif"
    bad.write_bytes(b"this is not a tiff" * 10)
    write_tif(root / "train" / "s2_mask.tif", np.zeros((1, 6, 7), dtype=np.uint8))
    ds = TinyFolder(**dataset_kwargs(root))
    index = [ds.sample_name(i) for i in range(len(ds))].index("s2")
    with pytest.raises(OSError, match=r"s2_image\.tif"):
        ds[index]


def test_mask_without_image_and_wrong_band_count(folder):
    root, _, mask = folder
    write_tif(root / "train" / "s3_mask.tif", mask[None])
    with pytest.raises(FileNotFoundError, match=r"s3_image\.tif"):
        TinyFolder(**dataset_kwargs(root))
    write_tif(root / "train" / "s3_image.tif", np.zeros((2, 6, 7), dtype=np.float32))
    ds = TinyFolder(**dataset_kwargs(root))
    with pytest.raises(ValueError, match=r"s3_image\.tif.* 2 bands .*expects 4"):
        ds[[ds.sample_name(i) for i in range(len(ds))].index("s3")]


# ---------------------------------------------------------------------------- transforms


def derived_mask(image: torch.Tensor) -> torch.Tensor:
    """A label computed pixelwise from the image: stays aligned only if both move together."""
    return (image[0] > image[1]).long() + 2 * (image[2] > 0.5).long()  # (H, W)


def test_geometric_transforms_keep_image_and_mask_aligned_and_bands_in_order():
    identity = JointTransform([0.0] * 3, [1.0] * 3, crop_size=12, hflip=0.5, vflip=0.5, rot90=True)
    torch.manual_seed(0)
    base = torch.rand(3, 20, 17)
    image = base + torch.arange(3).view(3, 1, 1) * 10  # band c lies in [10c, 10c + 1)
    mask = derived_mask(base)
    for seed in range(30):
        torch.manual_seed(seed)
        out_image, out_mask = identity(image, mask)
        assert out_image.shape == (3, 12, 12) and out_mask.shape == (12, 12)
        for c in range(3):
            assert ((out_image[c] >= 10 * c) & (out_image[c] < 10 * c + 1)).all()
        restored = out_image - torch.arange(3).view(3, 1, 1) * 10
        assert torch.equal(derived_mask(restored), out_mask)


def test_flips_and_rotations_act_on_spatial_axes_only():
    image = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    mask = torch.arange(16).view(4, 4)
    out_image, out_mask = JointTransform([0.0] * 2, [1.0] * 2, hflip=1.0)(image, mask)
    assert torch.equal(out_image, image.flip(-1)) and torch.equal(out_mask, mask.flip(-1))
    out_image, out_mask = JointTransform([0.0] * 2, [1.0] * 2, vflip=1.0)(image, mask)
    assert torch.equal(out_image, image.flip(-2)) and torch.equal(out_mask, mask.flip(-2))

    rotate = JointTransform([0.0] * 2, [1.0] * 2, rot90=True)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out_mask = rotate(image, mask)
        k = next(k for k in range(4) if torch.equal(out_mask, mask.rot90(k, dims=(0, 1))))
        assert torch.equal(out_image, image.rot90(k, dims=(1, 2)))
        seen.add(k)
    assert seen == {0, 1, 2, 3}

    wide_image, wide_mask = torch.rand(2, 4, 6), torch.arange(24).view(4, 6)
    for seed in range(10):
        torch.manual_seed(seed)
        assert rotate(wide_image, wide_mask)[1].shape == (4, 6)


def test_same_seed_same_augmentation():
    t = JointTransform([0.0], [1.0], crop_size=5, hflip=0.5, vflip=0.5, rot90=True)
    image, mask = torch.rand(1, 16, 16), torch.randint(0, 3, (16, 16))
    torch.manual_seed(3)
    first = t(image, mask)
    torch.manual_seed(3)
    second = t(image, mask)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_normalisation_matches_numpy():
    rng = np.random.default_rng(1)
    image = rng.normal(500, 200, size=(3, 5, 6)).astype(np.float32)
    mean, std = [480.0, 10.0, -3.0], [150.0, 2.0, 0.25]
    out, _ = JointTransform(mean, std)(torch.from_numpy(image), torch.zeros(5, 6, dtype=torch.long))
    expected = (image - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_crop_with_min_labelled_fraction_finds_sparse_labels():
    mask = torch.full((64, 64), -1, dtype=torch.long)
    mask[50:53, 5:8] = 2  # 9 labelled pixels
    image = torch.rand(1, 64, 64)
    plain = JointTransform([0.0], [1.0], crop_size=16)
    sparse = JointTransform(
        [0.0], [1.0], crop_size=16, min_labelled_fraction=0.01, max_crop_tries=2
    )
    empty_plain, empty_sparse = 0, 0
    for seed in range(40):
        torch.manual_seed(seed)
        empty_plain += int((plain(image, mask)[1] != -1).sum() == 0)
        torch.manual_seed(seed)
        out = sparse(image, mask)[1]
        assert (out == 2).sum() == 9  # the whole 3×3 patch fits in the centred fallback crop
        empty_sparse += int((out != -1).sum() == 0)
    assert empty_plain > 20 and empty_sparse == 0

    unlabelled = torch.full((64, 64), -1, dtype=torch.long)
    assert sparse(image, unlabelled)[1].shape == (16, 16)  # no label anywhere: still a crop


def test_crop_pads_small_images():
    rng = np.random.default_rng(2)
    image = rng.uniform(-5, 5, size=(2, 5, 3)).astype(np.float32)
    mask = rng.integers(0, 3, size=(5, 3))
    mean, std = [1.0, 0.5], [2.0, 0.25]
    out_image, out_mask = JointTransform(mean, std, crop_size=8, ignore_index=-7)(
        torch.from_numpy(image), torch.from_numpy(mask)
    )
    assert out_image.shape == (2, 8, 8) and out_mask.shape == (8, 8)
    out_image, out_mask = out_image.numpy(), out_mask.numpy()
    # The image sits at the top left; padding is added at the bottom and right.
    original = np.zeros((8, 8), dtype=bool)
    original[:5, :3] = True
    expected = (image - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(out_image[:, :5, :3], expected, rtol=1e-6, atol=1e-6)
    assert np.isnan(out_image[:, ~original]).all()  # padded pixels are invalid (NaN)
    assert not np.isnan(out_image[:, original]).any()
    np.testing.assert_array_equal(out_mask[:5, :3], mask)
    assert (out_mask[~original] == -7).all()


def test_build_transform_picks_stats_by_name_and_disables_augmentation_for_eval():
    stats = {"mean": {"A": 1.0, "B": 2.0, "C": 3.0}, "std": {"A": 4.0, "B": 5.0, "C": 6.0}}
    spec = DataSpec(bands=("C", "A"), classes=("x", "y"), ignore_index=9, **stats)
    image, mask = torch.rand(2, 7, 9), torch.randint(0, 2, (7, 9))
    t = build_transform(spec, False, 4, hflip=1.0, vflip=1.0, rot90=True, min_labelled_fraction=0.5)
    assert t.crop_size is None and t.hflip == 0 and t.vflip == 0 and not t.rot90
    assert t.min_labelled_fraction == 0 and t.ignore_index == 9
    out_image, out_mask = t(image, mask)
    expected = (image - torch.tensor([3.0, 1.0]).view(2, 1, 1)) / torch.tensor([6.0, 4.0]).view(
        2, 1, 1
    )
    assert torch.allclose(out_image, expected) and torch.equal(out_mask, mask)
    train = build_transform(spec, True, 4, hflip=1.0)
    assert (train.crop_size, train.hflip, train.ignore_index) == (4, 1.0, 9)
    assert train(image, mask)[0].shape == (2, 4, 4)
    with pytest.raises(ValueError, match=r"band mean lacks bands \['D'\]"):
        DataSpec(bands=("D",), **stats)


def test_build_transform_uses_the_spec_band_order():
    # Statistics dicts in B2, B4, B8 order; the spec (and the image channels) in B8, B2, B4.
    stats = {
        "mean": {"B2": 100.0, "B4": 300.0, "B8": 2000.0},
        "std": {"B2": 10.0, "B4": 30.0, "B8": 400.0},
    }
    spec = DataSpec(bands=("B8", "B2", "B4"), classes=("a", "b"), ignore_index=-3, **stats)
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 3000, size=(3, 6, 6)).astype(np.float32)
    mask = rng.integers(0, 2, size=(6, 6))
    mean = np.array([stats["mean"][b] for b in ("B8", "B2", "B4")])
    std = np.array([stats["std"][b] for b in ("B8", "B2", "B4")])
    expected = (image - mean[:, None, None]) / std[:, None, None]
    for train in (False, True):  # a crop the size of the image is the whole image
        out, out_mask = build_transform(spec, train, crop_size=6)(
            torch.from_numpy(image), torch.from_numpy(mask)
        )
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out_mask.numpy(), mask)
    # The spec's ignore_index pads the mask.
    _, padded = build_transform(spec, True, crop_size=7)(
        torch.from_numpy(image), torch.from_numpy(mask)
    )
    assert (padded[6, :] == -3).all() and (padded[:, 6] == -3).all()


def test_transform_validation_messages():
    # A std of 0 or below (or not finite) is refused where the statistics enter: the DataSpec.
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"band std must be > 0.*'B': {bad}"):
            DataSpec(bands=("A", "B"), mean={"A": 0.0, "B": 0.0}, std={"A": 1.0, "B": bad})
    with pytest.raises(ValueError, match=r"band std is not finite.*'B': inf"):
        DataSpec(bands=("A", "B"), mean={"A": 0.0, "B": 0.0}, std={"A": 1.0, "B": np.inf})
    with pytest.raises(ValueError, match="mean has 2 values but std has 1"):
        JointTransform([0.0, 0.0], [1.0])
    t = JointTransform([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="image has 3 channels but mean/std have 2"):
        t(torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return prepare_demo(str(tmp_path_factory.mktemp("demo") / "cache"))


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """The raw spyndex sample, bands B02, B03, B04, B08, as (4, 300, 300) int64."""
    data = spyndex.datasets.open("sentinel")
    assert list(data.band.values) == ["B02", "B03", "B04", "B08"]
    return np.asarray(data.values, dtype=np.int64)


def tile_offset(ds: DemoVegetation, index: int) -> tuple[int, int]:
    """(row, column) of a tile in the scene, from its georeferencing alone."""
    _, transform = ds.georeference(index)
    x0, y0 = demo_module.DEMO_SCENE_ORIGIN
    col, row = (transform.c - x0) / 10.0, (y0 - transform.f) / 10.0
    assert col == int(col) and row == int(row)
    return int(row), int(col)


def oracle_labels(scene: np.ndarray) -> np.ndarray:
    red, nir = scene[2].astype(np.float64), scene[3].astype(np.float64)
    ndvi = (nir - red) / (nir + red)
    labels = np.full(ndvi.shape, 3)
    labels[ndvi < 0.6] = 2
    labels[ndvi < 0.4] = 1
    labels[ndvi < 0.2] = 0
    return labels


def test_demo_labels_and_images_match_spyndex(demo_root, scene):
    labels = oracle_labels(scene)
    for split in ("train", "val", "test"):
        ds = DemoVegetation(root=str(demo_root), split=split, bands=["B8", "B2"])
        for index in (0, len(ds) - 2):
            row, col = tile_offset(ds, index)
            assert ds.sample_name(index) == f"r{row:03d}_c{col:03d}"
            sample = ds[index]
            window = (slice(row, row + 64), slice(col, col + 64))
            np.testing.assert_array_equal(
                sample["image"].numpy(), scene[[3, 0]][(slice(None), *window)]
            )
            np.testing.assert_array_equal(sample["mask"].numpy(), labels[window])


def test_demo_splits_are_disjoint_inside_their_strips_and_scored_once(demo_root, scene):
    labels = oracle_labels(scene)
    regions = {"train": (0, 172), "val": (172, 236), "test": (236, 300)}
    covered = {}
    for split, (start, stop) in regions.items():
        ds = DemoVegetation(root=str(demo_root), split=split)
        counts = np.zeros((300, 300), dtype=int)
        scored = np.zeros((300, 300), dtype=int)
        for index in range(len(ds)):
            row, col = tile_offset(ds, index)
            assert start <= row and row + 64 <= stop and 0 <= col and col + 64 <= 300
            mask = ds[index]["mask"].numpy()
            counts[row : row + 64, col : col + 64] += 1
            scored[row : row + 64, col : col + 64] += mask != -1
            labelled = mask != -1
            assert np.array_equal(mask[labelled], labels[row : row + 64, col : col + 64][labelled])
        covered[split] = counts > 0
        assert covered[split][start:stop].all()  # the whole strip is tiled
        if split != "train":
            assert len(ds) == 5 and (scored[start:stop] == 1).all()
        else:
            assert len(ds) == 45
    assert not (covered["train"] & covered["val"]).any()
    assert not (covered["train"] & covered["test"]).any()
    assert not (covered["val"] & covered["test"]).any()


def test_demo_georeference(demo_root):
    ds = DemoVegetation(root=str(demo_root), split="val")
    for index in range(len(ds)):
        crs, transform = ds.georeference(index)
        assert crs.to_epsg() == 32631
        assert (transform.a, transform.b, transform.d, transform.e) == (10.0, 0.0, 0.0, -10.0)
        row, col = (int(v) for v in ds.sample_name(index)[1:].split("_c"))
        x0, y0 = demo_module.DEMO_SCENE_ORIGIN
        assert (transform.c, transform.f) == (x0 + 10.0 * col, y0 - 10.0 * row)
        assert ds.spec.gsd == transform.a  # the class's GSD is the tiles' pixel size
    assert DemoVegetation.gsd == 10.0 and ds.spec.gsd == 10.0
    assert ds.spec.reflectance_scale == 10000.0 and ds.spec.sensor == "sentinel2a"
    assert ds.spec.nodata is None and ds.spec.display_bands == ("B4", "B3", "B2")
    with rasterio.open(ds.samples[0].images["image"]) as src:
        assert src.descriptions == ("B2", "B3", "B4", "B8")


def test_demo_band_stats_are_the_train_strip_stats(scene):
    train = scene[:, :172].astype(np.float64)
    for i, band in enumerate(["B2", "B3", "B4", "B8"]):
        assert DEMO_BAND_STATS["mean"][band] == pytest.approx(train[i].mean(), abs=1e-3)
        assert DEMO_BAND_STATS["std"][band] == pytest.approx(train[i].std(), abs=1e-3)


def test_demo_cache_is_reused(demo_root):
    files = sorted(demo_root.rglob("*.tif"))
    assert len(files) == 2 * (45 + 5 + 5)
    before = {f: f.stat().st_mtime_ns for f in [*files, demo_root / "manifest.json"]}
    DemoVegetation(root=str(demo_root), split="train", classes=DEMO_CLASSES)
    assert prepare_demo(str(demo_root)) == demo_root
    assert {f: f.stat().st_mtime_ns for f in before} == before


def test_demo_concurrent_writer_loses_gracefully(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    real_write = demo_module._write_tiles

    def other_rank_finishes_first(folder: Path) -> dict:
        splits = real_write(folder)
        monkeypatch.setattr(demo_module, "_write_tiles", real_write)
        prepare_demo(str(root))  # the other rank renames its copy into place first
        return splits

    monkeypatch.setattr(demo_module, "_write_tiles", other_rank_finishes_first)
    assert prepare_demo(str(root)) == root
    manifest = json.loads((root / "manifest.json").read_text())
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # the loser's temp folder is gone
    assert len(manifest["splits"]["train"]) == 45
    assert len(DemoVegetation(root=str(root), split="test")) == 5


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"data'.*delete it or set dataset\.root"):
        DemoVegetation(root=str(tmp_path / "data"), split="train")


def test_demo_wrong_class_count(tmp_path):
    with pytest.raises(ValueError, match=r"\['a', 'b'\].*dataset\.classes"):
        DemoVegetation(root=str(tmp_path / "c"), split="train", classes=["a", "b"])


def test_demo_with_training_transform(demo_root):
    ds = DemoVegetation(root=str(demo_root), split="train")
    raw_image, raw_mask = ds[3]["image"].numpy(), ds[3]["mask"].numpy()  # (4, 64, 64), (64, 64)
    ds.transform = build_transform(ds.spec, True, 32, hflip=0.5, vflip=0.5, rot90=True)
    torch.manual_seed(0)
    sample = ds[3]
    assert sample["image"].shape == (4, 32, 32) and sample["mask"].shape == (32, 32)
    assert abs(sample["image"].mean().item()) < 3  # normalised, not raw reflectance
    assert ((sample["mask"] >= 0) & (sample["mask"] < 4)).all()
    # Oracle: undo the normalisation with DEMO_BAND_STATS; the result is a 32×32 window of the
    # raw tile under one of the 8 flips/rotations, the mask the same window of the raw mask.
    mean = np.array([DEMO_BAND_STATS["mean"][b] for b in ds.bands])
    std = np.array([DEMO_BAND_STATS["std"][b] for b in ds.bands])
    undone = sample["image"].numpy() * std[:, None, None] + mean[:, None, None]
    out_mask = sample["mask"].numpy()
    found = []
    for k in range(4):
        for flip in (False, True):
            image = np.rot90(undone, -k, axes=(1, 2))
            mask = np.rot90(out_mask, -k)
            if flip:
                image, mask = image[:, :, ::-1], mask[:, ::-1]
            for top in range(64 - 32 + 1):
                for left in range(64 - 32 + 1):
                    window = (slice(top, top + 32), slice(left, left + 32))
                    if np.array_equal(raw_mask[window], mask) and np.allclose(
                        raw_image[(slice(None), *window)], image, atol=0.05
                    ):
                        found.append((k, flip, top, left))
    assert found


def test_a_wrong_reflectance_scale_is_refused_with_the_likely_one(demo_root):
    """The demo stores L2A reflectance x10000 (real Sentinel-2 values): read at scale 1 its
    medians are ~10^3 "reflectance", at scale 10^8 ~10^-5; both are refused with the scale that
    fits, and the right scale gives the scene's own reflectance (spyndex's sample, / 10000)."""
    from datasets.demo import demo_scene

    for scale, suggested in ((1, "10000"), (1e8, "10000")):
        data = DemoVegetation(root=str(demo_root), split="train", reflectance_scale=scale)
        with pytest.raises(ValueError, match=rf"set dataset.reflectance_scale={suggested}\b.*"
                           r"check_reflectance_scale=false"):  # fmt: skip
            data.check_reflectance_scale()
    good = DemoVegetation(root=str(demo_root), split="train").check_reflectance_scale(samples=100)
    assert list(good) == ["B2", "B3", "B4", "B8"]
    scene = demo_scene().astype(np.float64) / 10000
    for i, band in enumerate(good):  # the training strips of the scene: near its own medians
        assert abs(good[band] - np.median(scene[i])) < 0.5 * np.median(scene[i])


def test_a_class_list_of_one_is_refused_before_any_model_is_built(demo_root):
    with pytest.raises(ValueError, match=r"has 1 class\(es\); segmentation needs at least 2"):
        FolderSegmentation(
            root=str(demo_root), split="train", available_bands=["B2", "B3", "B4", "B8"],
            bands=["B2"], classes=["a"], band_stats={"mean": {}, "std": {}},
        )  # fmt: skip


# ---- the regression demo ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_regression_root(tmp_path_factory) -> Path:
    return prepare_demo(str(tmp_path_factory.mktemp("demo_regression") / "cache"), "regression")


def test_the_regression_demo_target_is_the_green_leaf_index_of_the_scene(
    demo_regression_root, demo_root, scene
):
    """The target of every tile is GLI = (2G - R - B) / (2G + R + B) of the raw spyndex sample
    at the tile's place (found from its georeferencing), computed here with numpy and checked
    against spyndex's formula; the input is the RGB bands only; the tiles and splits are the
    segmentation demo's, and pixels scored in an earlier val/test tile are NaN (no target)."""
    from datasets import DemoIndexRegression

    blue, green, red = (scene[i].astype(np.float64) / 10000 for i in (0, 1, 2))
    gli = (2 * green - red - blue) / (2 * green + red + blue)
    np.testing.assert_allclose(
        spyndex.computeIndex("GLI", params={"G": green, "R": red, "B": blue}), gli, rtol=1e-12
    )
    for split in ("train", "val", "test"):
        ds = DemoIndexRegression(root=str(demo_regression_root), split=split)
        demo = DemoVegetation(root=str(demo_root), split=split)
        assert ds.bands == ["B2", "B3", "B4"] and ds.spec.targets == ("GLI",)
        assert [ds.sample_name(i) for i in range(len(ds))] == [
            demo.sample_name(i) for i in range(len(demo))
        ]
        for index in range(len(ds)):
            row, col = tile_offset(ds, index)
            window = (slice(row, row + 64), slice(col, col + 64))
            image, target = ds.read_sample(index)
            np.testing.assert_array_equal(image, scene[(slice(0, 3), *window)])
            not_scored = demo.read_sample(index)[1] == -1
            assert np.isnan(target[0][not_scored]).all()
            np.testing.assert_allclose(target[0][~not_scored], gli[window][~not_scored],
                                       rtol=1e-6, atol=1e-7)  # fmt: skip
    # The test strip's own reflectance (rows 236-299), as the plausibility check reads it.
    strip = {b: float(np.median(scene[i, 236:])) / 10000 for i, b in enumerate(["B2", "B3", "B4"])}
    assert ds.check_reflectance_scale(samples=5) == pytest.approx(strip, rel=0.05)


def test_the_regression_demo_batch_holds_nan_where_there_is_no_target(demo_regression_root):
    """The right-aligned val tile (columns 236-299) shares columns 236-255 with its neighbour:
    scored there only, so NaN in this tile's target, also in a batch."""
    from datasets import DemoIndexRegression

    ds = DemoIndexRegression(root=str(demo_regression_root), split="val")
    ds.transform = build_transform(ds.spec, train=False, crop_size=None)
    last = [ds.sample_name(i) for i in range(len(ds))].index("r172_c236")
    batch = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [0, last]), 2)))
    assert batch["target"].dtype == torch.float32 and batch["target"].shape == (2, 1, 64, 64)
    assert not torch.isnan(batch["target"][0]).any()
    assert torch.isnan(batch["target"][1, 0, :, :20]).all()
    assert not torch.isnan(batch["target"][1, 0, :, 20:]).any()
