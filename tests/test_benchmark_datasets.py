"""MADOS, HLS Burn Scars and Sen1Floods11 read from tiny fixtures written in their released
layouts (file names, folders, band files, dtypes, no-data values, split files): what the loaders
yield is checked against the values the fixtures wrote."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import MADOS, HLSBurnScars, Sen1Floods11
from datasets.mados import MADOS_BANDS, MADOS_CLASSES
from tests.conftest import TINY, run_cli
from tests.fakes import FLOOD_CHIPS as CHIPS
from tests.fakes import (
    HLS,
    MADOS_10M,
    S1F,
    hls_name,
    mados_band,
    mados_mask,
    north_up,
    write_floods,
    write_hls,
    write_mados,
    write_tif,
)
from tests.fakes import MADOS_SIZES as SIZES


def stats(bands: list[str]) -> dict:
    return {"mean": dict.fromkeys(bands, 0.0), "std": dict.fromkeys(bands, 1.0)}


# ---- MADOS ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mados_root(tmp_path_factory) -> Path:
    return write_mados(tmp_path_factory.mktemp("MADOS"))


def mados(root: Path, split: str, bands: list[str] | None = None) -> MADOS:
    bands = bands or list(MADOS_BANDS)
    return MADOS(root=str(root), split=split, bands=bands, classes=MADOS_CLASSES,
                 band_stats=stats(bands))  # fmt: skip


def test_mados_splits_band_order_upsampling_and_labels(mados_root):
    train = mados(mados_root, "train")
    assert [s.name for s in train.samples] == ["Scene_0_1", "Scene_0_2", "Scene_1_1"]
    assert [s.name for s in mados(mados_root, "val").samples] == ["Scene_1_2"]
    assert [s.name for s in mados(mados_root, "test").samples] == ["Scene_0_3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the files are not georeferenced: no warning leaks
        image, mask = train.read_sample(2)  # Scene_1 (S2B wavelengths)
    assert image.shape == (11, MADOS_10M, MADOS_10M) and image.dtype == np.float32
    for c, band in enumerate(MADOS_BANDS):
        factor = MADOS_10M // SIZES[MADOS_BANDS[band][0]]  # each coarse pixel -> a block
        expected = np.kron(mados_band(1, 1, band), np.ones((factor, factor), np.float32))
        np.testing.assert_array_equal(image[c], expected, err_msg=band)
    stored = mados_mask(1, 1).astype(np.int64)
    np.testing.assert_array_equal(mask, np.where(stored == 0, -1, stored - 1))
    assert mask.max() <= 14 and (mask == -1).any()


def test_mados_band_subset_in_the_order_asked(mados_root):
    dataset = mados(mados_root, "val", ["B8", "B2", "B12"])
    image, _ = dataset.read_sample(0)
    for c, band in enumerate(["B8", "B2", "B12"]):
        factor = MADOS_10M // SIZES[MADOS_BANDS[band][0]]
        np.testing.assert_array_equal(image[c], np.kron(mados_band(1, 2, band),
                                                        np.ones((factor, factor))))  # fmt: skip


def test_mados_missing_band_file_is_named(mados_root, tmp_path):
    import shutil

    broken = tmp_path / "MADOS"
    shutil.copytree(mados_root, broken)
    (broken / "Scene_0" / "20" / "Scene_0_L2R_rhorc_1614_2.tif").unlink()  # B11 of Scene_0_2
    with pytest.raises(FileNotFoundError, match=r"Scene_0_2 has no file for band\(s\) B11"):
        mados(broken, "train")
    with pytest.raises(FileNotFoundError, match="splits/train_X.txt"):
        mados(tmp_path, "train")


# ---- HLS Burn Scars ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hls_root(tmp_path_factory) -> Path:
    return write_hls(tmp_path_factory.mktemp("hls"))


def hls(root: Path, split: str, **kwargs) -> HLSBurnScars:
    bands = HLSBurnScars.available_bands
    return HLSBurnScars(root=str(root), split=split, bands=bands,
                        classes=["Not burned", "Burn scar"], band_stats=stats(bands),
                        nodata=None, **kwargs)  # fmt: skip


def test_hls_splits_are_seeded_disjoint_and_test_is_validation(hls_root):
    train, val, test = (hls(hls_root, s) for s in ("train", "val", "test"))
    names = lambda d: {s.name for s in d.samples}  # noqa: E731
    assert names(test) == {hls_name(i) for i in range(100, 103)}
    assert len(val) == 1 and len(train) == 9
    assert names(train) | names(val) == {hls_name(i) for i in range(10)}
    assert not names(train) & names(val)
    assert names(hls(hls_root, "val")) == names(val)  # the same chips every time
    assert len(hls(hls_root, "val", val_fraction=0.3)) == 3


def test_hls_nodata_missing_labels_and_georeferencing(hls_root):
    test = hls(hls_root, "test")
    image, mask = test.read_sample(0)
    rng = np.random.default_rng(100)
    expected = rng.uniform(0, 0.4, (6, HLS, HLS)).astype(np.float32)
    expected_mask = rng.integers(0, 2, (HLS, HLS)).astype(np.int64)
    expected[:, 0, 0] = np.nan
    expected[2, 1, 1] = np.nan
    expected_mask[0, :4] = -1
    np.testing.assert_array_equal(image, expected)  # NaN where 9999
    np.testing.assert_array_equal(mask, expected_mask)
    crs, transform = test.georeference(0)
    assert crs.to_epsg() == 32633 and transform.a == 30


def test_hls_samples_carry_their_date_and_centre_for_prithvi_tl(tmp_path):
    """Date from the name (YYYYDDD), centre from the georeferencing: in EPSG:4326 the centre is
    the origin plus half the extent; in UTM 33N a centre at easting 500 km is on 15° E."""
    image = np.zeros((6, HLS, HLS), np.float32)
    mask = np.zeros((HLS, HLS), np.int16)
    name = "subsetted_512x512_HLS.S30.T11SLT.2020245.v1.4"
    degrees = north_up(-120.0, 40.0, 0.001, 0.002)
    write_tif(tmp_path / "validation" / f"{name}_merged.tif", image, crs="EPSG:4326",
              transform=degrees)  # fmt: skip
    write_tif(tmp_path / "validation" / f"{name}.mask.tif", mask, crs="EPSG:4326",
              transform=degrees)  # fmt: skip
    sample = hls(tmp_path, "test")[0]
    assert sample["temporal_coords"].tolist() == [2020.0, 245.0]
    lat, lon = sample["location_coords"].tolist()
    assert lat == pytest.approx(40.0 - 0.002 * HLS / 2) and lon == pytest.approx(
        -120 + 0.001 * HLS / 2
    )
    utm = north_up(500000 - 30 * HLS / 2, 4000000, 30, 30)
    write_tif(tmp_path / "validation" / f"{name}.mask.tif", mask, transform=utm)
    lat, lon = hls(tmp_path, "test").sample_metadata(0)["location_coords"].tolist()
    assert lon == pytest.approx(15.0, abs=1e-6) and 36.0 < lat < 36.3


# ---- Sen1Floods11 --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def floods_root(tmp_path_factory) -> Path:
    return write_floods(tmp_path_factory.mktemp("sen1floods11"))


def test_sen1floods11_optical_and_sar_from_the_split_files(floods_root):
    for split, chips in CHIPS.items():
        dataset = Sen1Floods11(root=str(floods_root), split=split, bands=["B8A", "B2", "B10"],
                               classes=["Not Water", "Water"], band_stats=stats(["B8A", "B2", "B10"]))  # fmt: skip
        assert [s.name for s in dataset.samples] == chips
    chip = CHIPS["train"][1]
    rng = np.random.default_rng(len(chip) + 1)
    optical = rng.integers(0, 10000, (13, S1F, S1F)).astype(np.uint16)
    sar = rng.normal(-12, 4, (2, S1F, S1F)).astype(np.float32)
    label = rng.integers(-1, 2, (S1F, S1F)).astype(np.int64)
    dataset = Sen1Floods11(root=str(floods_root), split="train", bands=["B8A", "B2", "B10"],
                           classes=["Not Water", "Water"], band_stats=stats(["B8A", "B2", "B10"]))  # fmt: skip
    image, mask = dataset.read_sample(1)
    order = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
    np.testing.assert_array_equal(image, optical[[order.index(b) for b in ("B8A", "B2", "B10")]])
    np.testing.assert_array_equal(mask, label)  # -1 is the ignore index already
    radar = Sen1Floods11(root=str(floods_root), split="train", modality="sar", bands=["VH", "VV"],
                         classes=["Not Water", "Water"], band_stats=stats(["VV", "VH"]),
                         display_bands=["VV", "VH", "VV"])  # fmt: skip
    image, _ = radar.read_sample(1)
    sar[:, 2, 3] = np.nan
    np.testing.assert_array_equal(image, sar[[1, 0]])
    with pytest.raises(ValueError, match="band 'VV' is not available"):
        Sen1Floods11(root=str(floods_root), split="train", bands=["VV"], classes=["a", "b"],
                     band_stats=stats(["VV"]))  # fmt: skip


# ---- end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dataset",
    [
        pytest.param("mados", marks=pytest.mark.slow),
        "hls_burn_scars",
        pytest.param("sen1floods11", marks=pytest.mark.slow),
    ],
)  # each reader is tested without training; one trains in the default suite
def test_a_few_training_steps_on_each_fixture(dataset, mados_root, hls_root, floods_root,
                                              tmp_path):  # fmt: skip
    root = {"mados": mados_root, "hls_burn_scars": hls_root, "sen1floods11": floods_root}[dataset]
    run_cli([*TINY, f"dataset={dataset}", f"dataset.root={root}", "img_size=16", "epochs=1",
             "max_steps_per_epoch=1", "batch_size=2", "finetune=deflect", "num_vis=1"],
            tmp_path)  # fmt: skip
    (work_dir,) = (tmp_path / "work_dirs").iterdir()
    summary = json.loads((work_dir / "metrics.json").read_text())
    assert summary["train_images"] == 2
    assert summary["test"]["pixels"] > 0


# ---- options a user expects ----------------------------------------------------------------------
def test_limited_label_keeps_a_seeded_fraction_of_training_only(hls_root):
    full = {s.name for s in hls(hls_root, "train").samples}
    cut = hls(hls_root, "train", limited_label=0.34)
    names = {s.name for s in cut.samples}
    assert len(names) == round(0.34 * 9) == 3 and names <= full
    assert names == {s.name for s in hls(hls_root, "train", limited_label=0.34).samples}
    other = {
        s.name for s in hls(hls_root, "train", limited_label=0.34, limited_label_seed=5).samples
    }
    assert len(other) == 3 and other <= full
    assert len(hls(hls_root, "test", limited_label=0.34)) == 3  # other splits are never cut
    with pytest.raises(ValueError, match="limited_label=1.5"):
        hls(hls_root, "train", limited_label=1.5)


def test_median_frequency_class_weights_from_the_dataset_yaml():
    from hydra import compose, initialize_config_dir

    from deflect.engine.build import class_weights
    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=mados", "loss.class_weights=median_frequency"])
    freqs = [0.00336, 0.00241, 0.00336, 0.00142, 0.00775, 0.18452, 0.34775, 0.20638, 0.00062,
             0.1169, 0.09188, 0.01309, 0.00917, 0.00176, 0.00963]  # fmt: skip
    median = sorted(freqs)[7]  # 15 classes: the 8th smallest, 0.00917

    class Spec:
        num_classes = 15

    weights = class_weights(cfg, Spec())
    assert weights == pytest.approx([median / f for f in freqs])
    assert weights[freqs.index(0.00917)] == pytest.approx(1.0)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["loss.class_weights=median_frequency"])  # demo
    with pytest.raises(ValueError, match="needs dataset.class_frequencies"):
        class_weights(cfg, type("S", (), {"num_classes": 4})())


PRITHVI_TINY = [
    "encoder=prithvi_eo2_300_tl",
    "encoder.embed_dim=32",
    "encoder.depth=4",
    "encoder.num_heads=4",
    "encoder.patch_size=8",
    "encoder.output_layers=[0,1,2,3]",
]


def test_prithvi_tl_on_hls_gets_each_samples_date_and_place(hls_root, tmp_path):
    """The batch gives the TL encoder its coordinates by name, and a run trains on them."""
    from torch.utils.data import default_collate

    from deflect.encoders import PrithviEncoder
    from deflect.engine.evaluator import batch_metadata
    from tests.conftest import s2_spec

    data = hls(hls_root, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = PrithviEncoder("tl", s2_spec(data.bands), img_size=16, patch_size=8,
                                 embed_dim=32, depth=1, num_heads=4,
                                 coords_encoding=["time", "location"])  # fmt: skip
    batch = default_collate([data[0], data[1]])
    metadata = batch_metadata(encoder, batch, torch.device("cpu"))
    assert set(metadata) == {"temporal_coords", "location_coords"}
    assert metadata["temporal_coords"].tolist() == [[2018.0, 100.0], [2018.0, 101.0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped embedding would warn
        encoder(batch["image"][..., :16, :16], **metadata)
    run_cli([*TINY, *PRITHVI_TINY, "dataset=hls_burn_scars", f"dataset.root={hls_root}",
             "img_size=16", "epochs=1", "max_steps_per_epoch=1", "batch_size=2",
             "finetune=deflect"], tmp_path)  # fmt: skip
    (work_dir,) = (tmp_path / "work_dirs").iterdir()
    assert json.loads((work_dir / "metrics.json").read_text())["train_images"] == 2
