"""The user's own GeoTIFFs (``dataset=folder``, :class:`datasets.GeoTIFFFolder`): two layouts
with and without split files, band names from the band descriptions, statistics computed over
the training split against numpy and cached with the files they came from, and the errors a
user meets."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

import datasets.raster_folder as raster_folder
from datasets import GeoTIFFFolder
from tests.conftest import TINY, load_script, run_cli
from tests.fakes import north_up, write_damaged_tif, write_folder_dataset, write_tif

BANDS = ["B2", "B3", "B4", "B8"]
CLASSES = ["water", "field", "forest"]
NODATA = -9999.0


#: This module's georeferencing: UTM 31N at 10 m.
UTM31N = {"crs": "EPSG:32631", "transform": north_up(600000, 5000000, 10, 10)}
write = partial(write_tif, **UTM31N)


def chip(seed: int, size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(1000 + 300 * np.arange(4)[:, None, None], 200, (4, size, size))
    image = image.astype(np.float32)
    image[:, 0, :3] = NODATA  # no data in every band
    image[2, 5, 5] = np.nan
    mask = rng.integers(0, 3, (size, size)).astype(np.uint8)
    mask[0, :2] = 255  # unlabelled
    return image, mask


def write_split_folders(root: Path, descriptions=BANDS) -> Path:
    """Layout A: <root>/<split>/<name>_image.tif + <name>_mask.tif, bands named in the file."""
    seeds = {"train": range(5), "val": range(10, 12), "test": range(20, 22)}
    tiles = [
        (split, f"tile{seed:02d}", *chip(seed)) for split, ids in seeds.items() for seed in ids
    ]
    return write_folder_dataset(root, tiles, descriptions, **UTM31N)


def write_flat(root: Path, n: int = 10) -> Path:
    """Layout B: images/<name>.tif and labels/<name>_lbl.tif, no band descriptions."""
    tiles = [("", f"s{seed:02d}", *chip(100 + seed)) for seed in range(n)]
    return write_folder_dataset(root, tiles, image="images/{name}.tif",
                                mask="labels/{name}_lbl.tif", **UTM31N)  # fmt: skip


def folder(root: Path, split: str = "train", **kwargs) -> GeoTIFFFolder:
    kwargs.setdefault("classes", CLASSES)
    kwargs.setdefault("ignore_index", 255)
    kwargs.setdefault("nodata", NODATA)
    return GeoTIFFFolder(root=str(root), split=split, **kwargs)


FLAT = {"images": "images/{name}.tif", "masks": "labels/{name}_lbl.tif", "available_bands": BANDS}


def numpy_stats(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    pixels = []
    for path in paths:
        with rasterio.open(path) as src:
            x = src.read().astype(np.float64)
        x[x == NODATA] = np.nan
        pixels.append(x.reshape(4, -1))
    allpix = np.concatenate(pixels, axis=1)
    return np.nanmean(allpix, axis=1), np.nanstd(allpix, axis=1)


def test_statistics_equal_numpys_and_are_cached_with_their_files(tmp_path, monkeypatch):
    root = write_split_folders(tmp_path / "a")
    data = folder(root)
    assert data.bands == BANDS  # from the band descriptions
    mean, std = numpy_stats(sorted((root / "train").glob("*_image.tif")))
    np.testing.assert_allclose(data.spec.mean_list(), mean, rtol=1e-12)
    np.testing.assert_allclose(data.spec.std_list(), std, rtol=1e-12)
    cache = json.loads((root / "band_stats.json").read_text())
    assert sorted(cache["files"]) == [f"train/tile{i:02d}_image.tif" for i in range(5)]

    def no_compute(*args, **kwargs):
        raise AssertionError("recomputed although nothing changed")

    monkeypatch.setattr(raster_folder, "compute_band_stats", no_compute)
    assert folder(root, "val").spec.mean_list() == data.spec.mean_list()  # from the cache
    monkeypatch.undo()
    image, _ = chip(99)
    write(root / "train" / "tile00_image.tif", image * 2, BANDS)  # a training file changes
    os.utime(root / "train" / "tile00_image.tif", ns=(1, 1))
    changed = folder(root)
    mean2, _ = numpy_stats(sorted((root / "train").glob("*_image.tif")))
    np.testing.assert_allclose(changed.spec.mean_list(), mean2, rtol=1e-12)
    assert not np.allclose(mean2, mean)


def test_given_statistics_are_used_as_they_are(tmp_path):
    root = write_split_folders(tmp_path / "a")
    stats = {"mean": dict.fromkeys(BANDS, 5.0), "std": dict.fromkeys(BANDS, 2.0)}
    data = folder(root, band_stats=stats, bands=["B8", "B2"])
    assert data.bands == ["B8", "B2"] and data.spec.mean_list() == [5.0, 5.0]
    assert not (root / "band_stats.json").exists()
    image, _ = data.read_sample(0)
    expected, _ = chip(0)
    np.testing.assert_array_equal(image[0][1:], expected[3][1:])  # B8 first, as asked


def test_seeded_split_is_reproducible_disjoint_and_complete(tmp_path):
    root = write_flat(tmp_path / "b", n=10)
    names = {s: {x.name for x in folder(root, s, **FLAT).samples} for s in ("train", "val", "test")}
    assert [len(names[s]) for s in ("train", "val", "test")] == [8, 1, 1]
    assert set().union(*names.values()) == {f"s{i:02d}" for i in range(10)}
    assert not (names["train"] & names["val"] or names["train"] & names["test"])
    again = {x.name for x in folder(root, "val", **FLAT).samples}
    assert again == names["val"]
    other = {x.name for x in folder(root, "val", split_seed=7, val_fraction=0.3, **FLAT).samples}
    assert len(other) == 3


def test_split_files_name_the_samples(tmp_path):
    root = write_flat(tmp_path / "b", n=6)
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("s00\ns01\ns02.tif\n\n# comment\ns03\n")
    (root / "splits" / "val.txt").write_text("s04\n")
    (root / "splits" / "test.txt").write_text("s05\n")
    files = {s: f"splits/{s}.txt" for s in ("train", "val", "test")}
    train = folder(root, split_files=files, **FLAT)
    assert [s.name for s in train.samples] == ["s00", "s01", "s02", "s03"]
    (root / "splits" / "val.txt").write_text("s04\nnope\n")
    with pytest.raises(ValueError, match=r"match no image/mask pair, e.g. \['nope'\]"):
        folder(root, "val", split_files=files, **FLAT)


@pytest.mark.parametrize(
    "layout", ["split_folders", pytest.param("flat_with_split_files", marks=pytest.mark.slow)]
)
def test_a_folder_of_geotiffs_trains_end_to_end(layout, tmp_path):
    if layout == "split_folders":
        root = write_split_folders(tmp_path / "data")
        extra = []
    else:
        root = write_flat(tmp_path / "data", n=6)
        (root / "s").mkdir()
        for split, names in {"train": "s00\ns01\ns02\ns03", "val": "s04", "test": "s05"}.items():
            (root / "s" / f"{split}.txt").write_text(names)
        extra = ["dataset.images=images/*.tif", "dataset.masks=labels/*_lbl.tif",
                 f"dataset.available_bands=[{','.join(BANDS)}]",
                 "dataset.split_files={train: s/train.txt, val: s/val.txt, test: s/test.txt}"]  # fmt: skip
    run_cli([*TINY, "dataset=folder", f"dataset.root={root}", f"dataset.classes=[{','.join(CLASSES)}]",
             "dataset.ignore_index=255", f"dataset.nodata={NODATA}", "img_size=16", "epochs=1",
             "dataset.reflectance_scale=10000",
             "max_steps_per_epoch=1", "batch_size=2", "finetune=deflect", *extra], tmp_path)  # fmt: skip
    (work_dir,) = (tmp_path / "work_dirs").iterdir()
    summary = json.loads((work_dir / "metrics.json").read_text())
    assert summary["train_images"] == 2
    test_chips = 2 if layout == "split_folders" else 1
    # Left out: the 2 unlabelled pixels and the 3 without data in any band (2 of them both).
    assert summary["test"]["pixels"] == test_chips * (20 * 20 - 3)
    with rasterio.open(next((work_dir / "predictions").glob("*.tif"))) as src:
        assert src.crs.to_epsg() == 32631 and src.transform.a == 10
    best = torch.load(work_dir / "checkpoints" / "best.pt", weights_only=True)
    assert json.loads(best["data"])["bands"] == BANDS  # the band manifest travels with it
    roles = json.loads(best["band_roles"])
    assert roles["B8"]["pretrained"] == "-" and "DEFLECT" in roles["B8"]["adapter"]
    assert roles["B2"]["pretrained"] == "pretrained patch embedding, channel 2"


# ---- the errors a user meets --------------------------------------------------------------------
def test_a_mask_without_an_image_is_named(tmp_path):
    root = write_split_folders(tmp_path / "a")
    (root / "val" / "tile10_image.tif").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"mask\(s\) without an image, e.g. .*tile10_mask.tif"
    ):
        folder(root)


def test_images_with_other_band_counts_or_crs_are_named(tmp_path):
    root = write_split_folders(tmp_path / "a")
    image, _ = chip(0)
    write(root / "test" / "tile20_image.tif", image[:3], BANDS[:3])
    with pytest.raises(ValueError, match=r"tile20_image.tif' has 3 bands"):
        folder(root)
    write(root / "test" / "tile20_image.tif", image, BANDS, crs="EPSG:4326")
    with pytest.raises(ValueError, match=r"EPSG:4326.*same bands and CRS"):
        folder(root)


def test_a_class_id_outside_the_class_list_is_named(tmp_path):
    root = write_split_folders(tmp_path / "a")
    _, mask = chip(21)
    mask[3, 3] = 7
    write(root / "test" / "tile21_mask.tif", mask)
    test = folder(
        root,
        "test",
        band_stats={"mean": dict.fromkeys(BANDS, 0.0), "std": dict.fromkeys(BANDS, 1.0)},
    )
    test.read_sample(0)  # a clean mask reads
    with pytest.raises(
        ValueError, match=r"tile21_mask.tif' holds class id\(s\) \[7\] outside the 3"
    ):
        test.read_sample(1)
    write(root / "train" / "tile03_mask.tif", mask)
    with pytest.raises(ValueError, match=r"tile03_mask.tif' holds class id\(s\) \[7\]"):
        folder(root)  # found while computing the statistics, before training


def test_band_names_that_are_not_in_the_file_are_named(tmp_path):
    root = write_split_folders(tmp_path / "a")
    with pytest.raises(
        ValueError,
        match=r"band 'B11' is not available; available bands are \['B2', 'B3', 'B4', 'B8'\]",
    ):
        folder(root, bands=["B2", "B11"])
    flat = write_flat(tmp_path / "b", n=3)
    with pytest.raises(ValueError, match="has no band descriptions.*available_bands"):
        folder(flat, images="images/{name}.tif", masks="labels/{name}_lbl.tif")
    with pytest.raises(ValueError, match="lists 3 bands"):
        folder(flat, **{**FLAT, "available_bands": BANDS[:3]})


def test_compute_stats_script_prints_the_training_statistics(tmp_path, capsys):
    root = write_split_folders(tmp_path / "a")
    script = load_script("compute_stats")
    overrides = ["dataset=folder", f"dataset.root={root}", f"dataset.classes=[{','.join(CLASSES)}]",
                 "dataset.ignore_index=255", f"dataset.nodata={NODATA}",
                 "dataset.reflectance_scale=10000"]  # fmt: skip
    for force in ([], ["--force"]):
        stats = script.main([*overrides, *force])
        mean, std = numpy_stats(sorted((root / "train").glob("*_image.tif")))
        np.testing.assert_allclose([stats["mean"][b] for b in BANDS], mean, rtol=1e-12)
        np.testing.assert_allclose([stats["std"][b] for b in BANDS], std, rtol=1e-12)
    assert f"mean: {{B2: {mean[0]:.6g}" in capsys.readouterr().out


# ---- files as users bring them: read by name, their own no-data value, common band names --------
def test_each_file_is_read_by_its_own_band_names_not_by_position(tmp_path):
    """A file whose descriptions list the bands in another order is read by name everywhere:
    samples, statistics (against numpy, band by band) and the cache key."""
    root = write_split_folders(tmp_path / "a")
    image, mask = chip(3)
    order = [3, 1, 0, 2]  # B8, B3, B2, B4 in the file
    write(root / "train" / "tile03_image.tif", image[order], [BANDS[i] for i in order])
    data = folder(root)
    assert data.bands == BANDS
    sample = data.samples.index(next(s for s in data.samples if s.name == "tile03"))
    got, _ = data.read_sample(sample)
    expected = image.copy()
    expected[expected == NODATA] = np.nan
    np.testing.assert_array_equal(got, expected)  # B2, B3, B4, B8 whatever the file's order
    pixels = []
    for path in sorted((root / "train").glob("*_image.tif")):
        with rasterio.open(path) as src:
            x = src.read().astype(np.float64)
            names = list(src.descriptions)
        x[x == NODATA] = np.nan
        pixels.append(x[[names.index(b) for b in BANDS]].reshape(4, -1))
    np.testing.assert_allclose(data.spec.mean_list(), np.nanmean(np.hstack(pixels), 1), rtol=1e-12)
    np.testing.assert_allclose(data.spec.std_list(), np.nanstd(np.hstack(pixels), 1), rtol=1e-12)
    cache = json.loads((root / "band_stats.json").read_text())
    assert cache["files"]["train/tile03_image.tif"]["bands"] == ["B8", "B3", "B2", "B4"]
    write(root / "val" / "tile10_image.tif", image[[0, 1, 2, 2]], ["B2", "B3", "B4", "B5"])
    with pytest.raises(ValueError, match=r"tile10_image.tif' has bands \['B2', 'B3', 'B4', 'B5'\]"):
        folder(root)


def test_the_files_no_data_value_is_honoured_unless_the_config_says_otherwise(tmp_path):
    """int16 files declaring nodata=-9999: the statistics leave -9999 out (numpy oracle), the
    samples read it as NaN; dataset.nodata overrides it; files that disagree are refused."""
    root = tmp_path / "int16"
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        for i in range(n):
            image = rng.normal([[[448]], [[700]], [[900]], [[2500]]], 240, (4, 12, 12))
            image = image.round().astype(np.int16)
            image[:, :4, :] = -9999
            write(root / split / f"t{i}_image.tif", image, BANDS, nodata=-9999)
            write(root / split / f"t{i}_mask.tif", rng.integers(0, 3, (12, 12)).astype(np.uint8))
    data = folder(root, nodata=None)
    assert data.spec.nodata == -9999
    pixels = []
    for path in sorted((root / "train").glob("*_image.tif")):
        with rasterio.open(path) as src:
            x = src.read().astype(np.float64)
        x[x == -9999] = np.nan
        pixels.append(x.reshape(4, -1))
    np.testing.assert_allclose(data.spec.mean_list(), np.nanmean(np.hstack(pixels), 1), rtol=1e-12)
    assert 400 < data.spec.mean_list()[0] < 500 and data.spec.std_list()[0] < 300
    image, _ = data.read_sample(0)
    assert np.isnan(image[:, :4]).all() and not np.isnan(image[:, 4:]).any()
    (root / "band_stats.json").unlink()
    as_data = folder(root, nodata=-1.0)  # the config's value wins: -9999 is then data
    assert as_data.spec.nodata == -1.0 and as_data.spec.mean_list()[0] < 0
    write(root / "test" / "t0_image.tif", np.ones((4, 12, 12), np.float32), BANDS, nodata=0)
    with pytest.raises(ValueError, match=r"different no-data values: -9999 in .*, 0 in .*t0_image"):
        folder(root, nodata=None)


def test_common_band_names_and_wavelengths_map_through_spyndex_for_the_sensor(tmp_path):
    root = tmp_path / "named"
    for split in ("train", "val", "test"):
        image, mask = chip(1)
        names = (
            ["Blue", "Green", "Red", "NIR"]
            if split != "test"
            else ["490 nm", "B03", "red", "Near Infrared"]
        )
        write(root / split / "c_image.tif", image, names)
        write(root / split / "c_mask.tif", mask)
    data = folder(root)
    assert data.bands == ["B2", "B3", "B4", "B8"]  # Sentinel-2: NIR is B8 (B8A is NIR Narrow)
    assert data.band_sources == {"B2": "Blue", "B3": "Green", "B4": "Red", "B8": "NIR"}
    from deflect.engine import build
    from tests.test_configs import SHRINK, compose_with

    cfg = compose_with(["finetune=deflect", *SHRINK])
    table = build.band_table(build.build_model(cfg, data.spec), data.band_sources)
    assert table.splitlines()[0].split()[:5] == ["band", "in", "the", "files", "encoder"]
    assert table.splitlines()[4].split()[:2] == ["B8", "NIR"]
    (root / "band_stats.json").unlink()
    landsat = folder(root, sensor="landsat8")
    assert landsat.bands == ["B2", "B3", "B4", "B5"]  # Landsat 8: NIR is B5
    image, mask = chip(1)
    write(root / "val" / "c_image.tif", image, ["Blue", "Green", "Red", "Infrared-ish"])
    with pytest.raises(ValueError, match=r"band 'Infrared-ish' of .*c_image.tif' is neither a band "
                       r"of sensor 'sentinel2a'.*available_bands"):  # fmt: skip
        folder(root)


def test_masks_numbered_from_one_use_label_offset_and_the_error_suggests_it(tmp_path):
    root = tmp_path / "from1"
    rng = np.random.default_rng(2)
    for split in ("train", "val", "test"):
        image, _ = chip(4)
        mask = rng.integers(0, 4, (20, 20)).astype(np.uint8)  # 0 unlabelled, 1..3 the classes
        write(root / split / "m_image.tif", image, BANDS)
        write(root / split / "m_mask.tif", mask)
    with pytest.raises(ValueError, match=r"holds class id\(s\) \[3\].*set dataset.label_offset=1"):
        folder(root, ignore_index=-1)
    data = folder(root, ignore_index=-1, label_offset=1)
    image, mask = data.read_sample(0)
    with rasterio.open(root / "train" / "m_mask.tif") as src:
        stored = src.read(1).astype(np.int64)
    expected = np.where(stored == 0, -1, stored - 1)
    expected[np.isnan(image).all(axis=0)] = -1  # no band holds data there: never scored
    np.testing.assert_array_equal(mask, expected)


def test_an_image_and_its_mask_of_other_sizes_are_named_up_front(tmp_path):
    root = write_split_folders(tmp_path / "a")
    write(root / "test" / "tile21_mask.tif", np.zeros((20, 19), np.uint8))
    with pytest.raises(ValueError, match=r"tile21_image.tif' is 20x20 px but its mask .*20x19"):
        folder(root, "train")  # found while listing, before any training


def test_a_truncated_training_image_is_named_while_computing_statistics(tmp_path):
    root = write_split_folders(tmp_path / "a")
    path = root / "train" / "tile02_image.tif"
    pixels = np.random.default_rng(0).random((4, 20, 20), np.float32)
    write_damaged_tif(path, pixels, BANDS, slice(200, 3000), **UTM31N)
    with pytest.raises(OSError, match=r"cannot read pixels of GeoTIFF .*tile02_image.tif"):
        folder(root)


def test_the_statistics_cache_notices_contents_rewritten_with_size_and_time_kept(tmp_path):
    root = write_split_folders(tmp_path / "a")
    first = folder(root).spec.mean_list()
    path = root / "train" / "tile00_image.tif"
    stat = path.stat()
    image, _ = chip(0)
    write(path, np.where(image == NODATA, NODATA, image + 5.0), BANDS)  # same size and header
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    again = folder(root).spec.mean_list()
    assert again[0] > first[0] + 0.5  # recomputed, not the stale cache


def test_the_three_splits_log_each_dataset_fact_once(tmp_path, caplog):
    import logging

    root = write_split_folders(tmp_path / "a")
    image, _ = chip(30)
    write(root / "train" / "extra_image.tif", image, BANDS)  # an image without a mask
    with caplog.at_level(logging.INFO):
        folder(root)  # computes and caches the statistics
        for split in ("train", "val", "test"):
            folder(root, split)  # read them back: said once is enough
    messages = [r.getMessage() for r in caplog.records]
    assert sum("band statistics" in m for m in messages) == 1
    assert [m for m in messages if "band statistics" in m][0].startswith(
        "computed band statistics over 5 training images"
    )
    assert sum("have no mask" in m for m in messages) <= 1


def test_a_seeded_split_asked_for_is_never_empty(tmp_path):
    """Five pairs, 10 % each for val and test: 0.5 rounds to 0, and the old rule left val and
    test empty, so building them failed ("split 'val' has no samples"), far from the cause.
    The one rule (deflect.rasters.split_sizes, HLS Burn Scars' rule before) keeps one each."""
    root = write_flat(tmp_path / "b", n=5)
    sizes = [len(folder(root, s, **FLAT)) for s in ("train", "val", "test")]
    assert sizes == [3, 1, 1]


# ---- the regression form: a float target raster per image ---------------------------------------
TARGET_NODATA = -1.0


def write_regression(root: Path, target_descriptions=("height", "cover")) -> Path:
    """Layout A with ``<name>_target.tif``: two float targets, -1 (declared) for no target,
    and a NaN, beside images whose first row starts with 3 pixels without data."""
    for split, seeds in {"train": range(4), "val": [10], "test": [20]}.items():
        for seed in seeds:
            image, _ = chip(seed)
            target = np.random.default_rng(seed).uniform(0, 30, (2, 20, 20)).astype(np.float32)
            target[0, 4, 4] = TARGET_NODATA
            target[1, 6, 7] = np.nan
            write(root / split / f"tile{seed:02d}_image.tif", image, BANDS)
            write(root / split / f"tile{seed:02d}_target.tif", target, target_descriptions,
                  nodata=TARGET_NODATA)  # fmt: skip
    return root


def regression(root: Path, split: str = "train", **kwargs):
    from datasets import GeoTIFFFolderRegression

    kwargs.setdefault("nodata", NODATA)
    return GeoTIFFFolderRegression(root=str(root), split=split, **kwargs)


def test_a_regression_target_is_the_file_times_target_scale_with_nan_where_there_is_none(tmp_path):
    root = write_regression(tmp_path / "r")
    data = regression(root, "val", target_scale=0.5)
    assert data.spec.targets == ("height", "cover") and data.spec.classes == ()  # descriptions
    sample = data[0]
    assert sample["target"].dtype == torch.float32 and sample["target"].shape == (2, 20, 20)
    with rasterio.open(root / "val" / "tile10_target.tif") as src:
        expected = src.read().astype(np.float64) * 0.5
    expected[0, 4, 4] = np.nan  # the declared no-data value
    expected[:, 0, :3] = np.nan  # no image band has data there: nothing to predict from
    np.testing.assert_array_equal(sample["target"].numpy(), expected.astype(np.float32))
    assert torch.isnan(sample["target"][1, 6, 7])  # NaN always is no target
    # target_nodata overrides the files' tag: -1 is then a target value (times the scale)
    data = regression(root, "val", target_nodata=-5, target_names=["h", "c"])
    assert data.spec.targets == ("h", "c") and data[0]["target"][0, 4, 4] == -1.0


def test_augmentation_moves_the_targets_with_the_image_and_pads_with_nan(tmp_path):
    from datasets.transforms import build_transform

    root = write_regression(tmp_path / "r")
    data = regression(root, "val")
    raw_image, raw_target = data.read_sample(0)
    mean, std = np.array(data.spec.mean_list()), np.array(data.spec.std_list())
    data.transform = build_transform(data.spec, True, 24)  # larger than the 20-px image
    padded = data[0]
    assert padded["target"].shape == (2, 24, 24) and padded["image"].shape == (4, 24, 24)
    assert (
        torch.isnan(padded["target"][:, 20:]).all()
        and torch.isnan(padded["target"][..., 20:]).all()
    )
    np.testing.assert_array_equal(padded["target"][:, :20, :20].numpy(), raw_target)
    data.transform = build_transform(data.spec, True, 20, hflip=0.5, vflip=0.5, rot90=True)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = data[0]
        image = out["image"].numpy() * std[:, None, None] + mean[:, None, None]
        target = out["target"].numpy()
        for k in range(4):  # which of the 8 flips/rotations: the image and the target agree
            for flip in (False, True):
                want_t = np.rot90(raw_target, k, axes=(1, 2))
                want_i = np.rot90(raw_image, k, axes=(1, 2))
                if flip:
                    want_t, want_i = want_t[..., ::-1], want_i[..., ::-1]
                if np.array_equal(want_t, target, equal_nan=True) and np.allclose(
                    want_i, image, atol=0.05, equal_nan=True
                ):
                    seen.add((k, flip))
    assert len(seen) >= 3  # several draws, each the same move of image and target


def test_regression_errors_name_the_key_and_the_fix(tmp_path):
    root = write_regression(tmp_path / "r")
    with pytest.raises(ValueError, match=r"target_names=\['h'\] must name each of the 2 band"):
        regression(root, target_names=["h"])
    with pytest.raises(TypeError, match=r"dataset.classes is for segmentation"):
        regression(root, classes=["a", "b"])
    (root / "val" / "tile10_image.tif").rename(root / "val" / "gone.tif")
    with pytest.raises(FileNotFoundError, match=r"1 target\(s\) without an image.*dataset.targets"):
        regression(root)
