"""Image classification on the task-agnostic engine: GEO-Bench v1 tasks in their released layout
(read without running a pickle), your own chips, single- and multi-label metrics against hand
counts, the head's pooling, the NaN-aware resize, and runs with ``eval_dir`` reproducing them."""

from __future__ import annotations

import ast
import csv
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datasets import ChipFolder, GeoBench
from datasets.safe_pickle import safe_loads
from datasets.transforms import resize_nan_aware
from deflect.data import DataSpec
from deflect.pictures import PALETTE
from deflect.tasks import ClassificationTask
from tests.conftest import CHIP_CLASSES, REPO, TINY, copy_run, run_cli
from tests.fakes import (
    Evil,
    copy_with_band_names,
    geobench_modules,
    north_up,
    write_chips,
    write_geobench,
    write_tif,
)

CLASSES = CHIP_CLASSES  # the shared chip classifier's, used for every fixture here
SO2SAT = OmegaConf.load(REPO / "configs" / "dataset" / "m_so2sat.yaml")
CHANNELS = dict(SO2SAT.channels)


def geobench(root, split="train", **kwargs):
    kwargs.setdefault("reflectance_scale", 10000)
    return GeoBench(root=str(root), split=split, channels=CHANNELS, **kwargs)


@pytest.fixture(scope="module")
def so2sat(tmp_path_factory):
    return write_geobench(tmp_path_factory.mktemp("gb") / "m-so2sat", CLASSES,
                          {"train": 12, "valid": 4, "test": 6}, size=16)  # fmt: skip


# ---- GEO-Bench in its released layout -----------------------------------------------------------
def test_geobench_samples_labels_partitions_and_statistics(so2sat):
    import h5py

    train = geobench(so2sat)
    assert train.classes == CLASSES  # from task_specs.pkl, read without geobench installed
    partition = json.loads((so2sat / "default_partition.json").read_text())
    assert train.names == partition["train"] and len(geobench(so2sat, "val")) == 4  # "valid"
    few = geobench(so2sat, partition="0.50x_train")
    assert few.names == partition["train"][:6]  # the few-shot partition file, not the default
    sample = train[3]
    with h5py.File(so2sat / f"{train.names[3]}.hdf5") as f, geobench_modules():
        expected = np.stack([f[c][()] for c in CHANNELS]).astype(np.float32)
        label = pickle.loads(ast.literal_eval(f.attrs["pickle"]))["label"]  # our own fixture
    np.testing.assert_array_equal(sample["image"].numpy(), expected)
    assert sample["label"].item() == label
    stats = json.loads((so2sat / "band_stats.json").read_text())
    assert train.spec.mean["B8"] == stats["08 - NIR"]["mean"]


def test_the_band_order_fixes_of_eurosat_and_brick_kiln_follow_the_true_channels():
    eurosat = OmegaConf.load(REPO / "configs" / "dataset" / "m_eurosat.yaml").channels
    assert eurosat["08A - Vegetation Red Edge"] == "B9" and eurosat["12 - SWIR"] == "B8A"
    brick = OmegaConf.load(REPO / "configs" / "dataset" / "m_brick_kiln.yaml").channels
    # geo-bench issue #29: stored positions 5..9 hold B7, B8A, B8, B11, B12
    assert list(brick.values())[5:] == ["B7", "B8A", "B8", "B11", "B12"]


@pytest.mark.parametrize("where", ["sample", "task_specs"])
def test_a_hostile_pickle_is_refused_and_never_run(where, tmp_path):
    marker = tmp_path / "pwned"
    Evil.marker = marker
    root = tmp_path / "task"
    write_geobench(root, CLASSES, {"train": 3, "valid": 1, "test": 1},
                   hostile_sample="id_train_001" if where == "sample" else None)  # fmt: skip
    if where == "task_specs":
        (root / "task_specs.pkl").write_bytes(pickle.dumps({"label_type": Evil()}))
        with pytest.raises(ValueError, match=r"refused to read .*task_specs.pkl.*system"):
            geobench(root)
    else:  # every sample's label is read when the split is listed, before training
        with pytest.raises(ValueError, match=r"refused to read .*id_train_001.hdf5.*system"):
            geobench(root)
    assert not marker.exists()


def test_the_safe_unpickler_keeps_plain_data_only():
    plain = {"a": np.arange(3, dtype=np.int16), "b": np.float64(2.5), "c": [1, "x", (2, 3)]}
    out = safe_loads(str(pickle.dumps(plain, protocol=4)), "t")
    assert out["a"].tolist() == [0, 1, 2] and out["b"] == 2.5 and out["c"] == [1, "x", (2, 3)]
    for evil in (np.array([{"x": 1}], dtype=object), eval):
        with pytest.raises(ValueError, match="refused"):
            safe_loads(pickle.dumps(evil), "t")


# ---- your own chips -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["folders", "csv"])
def test_own_chips_by_folder_or_csv(layout, tmp_path):
    root = write_chips(tmp_path / layout, CLASSES, layout=layout)
    labels = "folders" if layout == "folders" else "labels.csv"
    train = ChipFolder(root=str(root), split="train", labels=labels, reflectance_scale=10000)
    assert train.classes == sorted(CLASSES) and len(train) == 9
    assert train.bands == ["B2", "B3", "B4", "B8"]  # from the band descriptions
    for i in range(len(train)):  # the label is the chip's class, whatever the layout
        name = train.names[i].split("/")[-1]
        assert train.classes[int(train[i]["label"])] == name.split("_")[0]
    with pytest.raises(ValueError, match=r"not among dataset.classes"):
        ChipFolder(root=str(root), split="train", labels=labels, classes=["forest", "field"])


def test_multi_label_chips_from_a_csv(tmp_path):
    root = write_chips(tmp_path / "m", CLASSES, layout="csv", multi_label=True)
    data = ChipFolder(root=str(root), split="test", labels="labels.csv", multi_label=True,
                      reflectance_scale=10000)  # fmt: skip
    with open(root / "labels.csv") as f:
        rows = {r["name"]: set(r["label"].split(";")) for r in csv.DictReader(f)}
    for i in range(len(data)):
        hot = data[i]["label"].numpy()
        assert {data.classes[k] for k in np.flatnonzero(hot)} == rows[data.names[i]]


# ---- metrics against hand counts ----------------------------------------------------------------
def spec(classes=("a", "b", "c")) -> DataSpec:
    return DataSpec(bands=("B2",), classes=tuple(classes), ignore_index=-1)


def test_single_label_metrics_equal_hand_counts_with_absent_classes():
    """Targets a a b b b, predictions a b b b a; class c absent from the ground truth: its F1
    is n/a and left out of the macro mean (precision 0 counted where it was predicted)."""
    task = ClassificationTask()
    metric = task.metric(spec(), torch.device("cpu"))
    target = torch.tensor([0, 0, 1, 1, 1])
    pred = torch.tensor([0, 1, 1, 1, 0])
    metric.update(torch.nn.functional.one_hot(pred, 3).float(), target)
    m = metric.compute()
    f1_a, f1_b = 2 * 1 / (2 * 1 + 1 + 1), 2 * 2 / (2 * 2 + 1 + 1)  # a: tp1 fp1 fn1; b: tp2 fp1 fn1
    assert m["per_class"]["a"]["F1"] == pytest.approx(f1_a)
    assert m["per_class"]["b"]["F1"] == pytest.approx(f1_b)
    assert m["per_class"]["c"]["F1"] is None and m["absent_classes"] == 1
    assert m["mF1"] == pytest.approx((f1_a + f1_b) / 2)
    assert m["OA"] == pytest.approx(3 / 5) and m["samples"] == 5 and "mIoU" not in m


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP by hand: mean precision at the rank of each positive (no ties in the scores)."""
    order = np.argsort(-scores)
    hits = labels[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / hits.sum())


def test_multi_label_metrics_threshold_probabilities_and_equal_hand_counts():
    """The threshold applies to sigmoid probabilities: a logit of 0.3 (probability 0.574) is
    a positive at 0.5, although the logit is below 0.5. Micro and macro F1, AP and mAP by hand;
    label c has no positive: n/a, out of the means."""
    task = ClassificationTask(multi_label=True, threshold=0.5)
    metric = task.metric(spec(), torch.device("cpu"))
    logits = torch.tensor([[0.3, -2.0, -1.0], [2.0, 0.1, -3.0], [-0.2, 1.5, -0.5],
                           [-1.0, -0.7, -2.5]])  # fmt: skip
    target = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 0]])
    metric.update(logits, target)
    m = metric.compute()
    decisions = (torch.sigmoid(logits) >= 0.5).int().numpy()
    t = target.numpy()
    tp = (decisions & t).sum(0)
    fp = (decisions & (1 - t)).sum(0)
    fn = ((1 - decisions) & t).sum(0)
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    assert decisions[0, 0] == 1  # the 0.3 logit
    assert m["per_class"]["a"]["F1"] == pytest.approx(f1[0])
    assert m["per_class"]["c"]["F1"] is None
    assert m["mF1"] == pytest.approx(f1[:2].mean())
    assert m["microF1"] == pytest.approx(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()))
    ap = [average_precision(logits[:, k].numpy(), t[:, k]) for k in range(2)]
    assert m["per_class"]["a"]["AP"] == pytest.approx(ap[0])
    assert m["mAP"] == pytest.approx(np.mean(ap))


# ---- the head and the input ---------------------------------------------------------------------
def test_the_head_pools_the_cls_token_the_patch_mean_or_both():
    from segmentors.classifier import ImageClassifier

    class Tokens(torch.nn.Module):
        embed_dim, num_prefix_tokens = 3, 1

        def forward_tokens(self, x):
            return x  # the input is the tokens

    tokens = torch.randn(2, 5, 3)  # CLS + 4 patches
    for pooling, expected in (("cls", tokens[:, 0]), ("mean", tokens[:, 1:].mean(1)),
                              ("cls_mean", torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1))):  # fmt: skip
        head = ImageClassifier(Tokens(), 2, pooling)
        torch.testing.assert_close(head.pool(tokens), expected)


def test_the_resize_keeps_invalid_pixels_out_of_valid_ones():
    """A NaN pixel neither spreads nor drags its neighbours: a constant image with holes resizes
    to the same constant everywhere (a weighted mean of valid pixels only), and away from the
    hole the result is the plain bilinear resize of the image without it."""
    image = torch.full((2, 16, 16), 7.0)
    image[0, 5, 6] = torch.nan
    image[1, 9:11, 2:4] = torch.nan
    down, up = resize_nan_aware(image, 8), resize_nan_aware(image, 24)
    assert torch.isfinite(down).all() and torch.isfinite(up[0]).all()
    torch.testing.assert_close(down, torch.full_like(down, 7.0))
    torch.testing.assert_close(up[torch.isfinite(up)], torch.full_like(up[torch.isfinite(up)], 7.0))
    ramp = torch.arange(256.0).reshape(1, 16, 16)
    holed = ramp.clone()
    holed[0, 2, 2] = torch.nan
    plain = torch.nn.functional.interpolate(ramp[None], size=(8, 8), mode="bilinear",
                                            align_corners=False, antialias=True)[0]  # fmt: skip
    torch.testing.assert_close(resize_nan_aware(holed, 8)[:, 4:, 4:], plain[:, 4:, 4:])


# ---- runs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def so2sat_run(so2sat, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cls_run")
    work_dir = cwd / "run"
    # 16-px chips at TINY's img_size of 32: evaluation resizes each chip to 32 px.
    run_cli([*TINY, "dataset=m_so2sat", f"dataset.root={so2sat}", "dataset.reflectance_scale=10000",
             f"work_dir={work_dir}", "epochs=2", "num_vis=2"], cwd)  # fmt: skip
    return work_dir


def test_a_geobench_run_writes_predictions_and_eval_dir_reproduces_them(so2sat, so2sat_run,
                                                                        tmp_path):  # fmt: skip
    work_dir = so2sat_run
    metrics = json.loads((work_dir / "test_metrics.json").read_text())
    assert metrics["samples"] == 6 and set(metrics["per_class"]) == set(CLASSES)
    assert 0 <= metrics["mF1"] <= 1 and "OA" in metrics
    rows = list(csv.DictReader(open(work_dir / "predictions.csv")))
    assert [r["sample"] for r in rows] == json.loads((so2sat / "default_partition.json")
                                                     .read_text())["test"]  # fmt: skip
    assert all(abs(sum(float(r[f"p_{c}"]) for c in CLASSES) - 1) < 1e-4 for r in rows)
    assert all(r["prediction"] == max(CLASSES, key=lambda c: float(r[f"p_{c}"])) for r in rows)
    confusion = np.array(metrics["confusion_matrix"])
    hand = np.zeros((3, 3), int)
    for r in rows:
        hand[CLASSES.index(r["label"]), CLASSES.index(r["prediction"])] += 1
    np.testing.assert_array_equal(confusion, hand)  # the CSV is the metrics' own evidence
    before = (work_dir / "predictions.csv").read_text()
    run_cli([f"eval_dir={work_dir}"], tmp_path)
    assert json.loads((work_dir / "test_metrics.json").read_text())["confusion_matrix"] == \
        metrics["confusion_matrix"]  # fmt: skip
    assert (work_dir / "predictions.csv").read_text() == before
    assert (work_dir / "test_predictions.png").stat().st_size > 1000
    assert (work_dir / "confusion_matrix.png").stat().st_size > 1000


def test_the_confusion_picture_draws_counts_and_row_shares():
    """confusion_matrix.png's cells: the counts and each row divided by its total (hand counts;
    an empty row stays 0), each cell shaded by its row share (255 - 200 x share, blue kept)."""
    from PIL import Image

    from deflect.pictures import confusion_cells, save_confusion_png

    matrix = [[3, 1, 0], [0, 4, 0], [0, 0, 0]]
    counts, shares = confusion_cells(matrix)
    assert counts.tolist() == matrix
    np.testing.assert_allclose(shares, [[0.75, 0.25, 0], [0, 1, 0], [0, 0, 0]])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        save_confusion_png(matrix, CLASSES, Path(tmp) / "c.png")
        pixels = np.asarray(Image.open(Path(tmp) / "c.png").convert("RGB")).reshape(-1, 3)
    colours = {tuple(int(v) for v in c) for c in np.unique(pixels, axis=0)}
    assert {(105, 105, 255), (205, 205, 255), (55, 55, 255), (255, 255, 255)} <= colours


def test_the_classification_picture_shows_misclassified_samples_first_under_one_stretch(tmp_path):
    """test_predictions.png: the misclassified sample comes first, then the correct ones in
    order; two uniform samples of different reflectance (0.1 and 0.3) are drawn with one common
    stretch, so they look different (each stretched on its own, both were black)."""
    from PIL import Image

    from deflect.tasks.classification import ClassificationWriter

    class Samples:
        spec = DataSpec(bands=("B2", "B3", "B4"), mean=dict.fromkeys(("B2", "B3", "B4"), 0.0),
                        std=dict.fromkeys(("B2", "B3", "B4"), 1.0), classes=("a", "b"))  # fmt: skip
        classes = ["a", "b"]

        def sample_name(self, index):
            return f"s{index}"

    images = torch.zeros(4, 3, 8, 8)
    images[0], images[1] = 0.1, 0.3  # uniform, both correct
    images[2] = torch.linspace(0, 1, 64).reshape(8, 8)  # misclassified
    images[3] = torch.linspace(1, 0, 64).reshape(8, 8)
    batch = {"image": images, "label": torch.tensor([0, 0, 1, 1]), "index": torch.arange(4)}
    writer = ClassificationWriter(Samples(), tmp_path, 3, True, ClassificationTask())
    writer(batch, torch.tensor([0, 0, 0, 1]), torch.zeros(4, 2))
    panels = writer.panels()
    assert [(t, p) for _, t, p in panels] == [("b", "a"), ("a", "a"), ("a", "a")]
    dark, bright = panels[1][0], panels[2][0]  # the 0.1 and the 0.3 sample
    assert (dark == dark[0, 0]).all() and (bright == bright[0, 0]).all()
    assert int(dark[0, 0, 0]) + 40 < int(bright[0, 0, 0])
    writer.finish(tmp_path)
    picture = np.asarray(Image.open(tmp_path / "test_predictions.png").convert("RGB"))
    side, top = 96, 30  # 8-px samples drawn at least 96 px, under a 30-px header
    rows = [picture[top + r * (side + 4) + side // 2, 4 + side // 2] for r in range(3)]
    assert tuple(rows[1]) == tuple(dark[0, 0]) and tuple(rows[2]) == tuple(bright[0, 0])


def test_a_classification_run_maps_a_scene_one_pixel_per_tile(so2sat, so2sat_run, tmp_path):
    """Six 16-px test samples of a run trained at img_size 32, laid side by side as one GeoTIFF
    scene (2 x 3 chips): predict.py tiles it at the training chip footprint (16 px, not the
    32-px encoder input) and resizes each tile as evaluation resizes a chip, so it writes a
    2 x 3 class map whose pixels are the classes predictions.csv gives those samples,
    georeferenced (a pixel spans a tile), and their probabilities."""
    import h5py
    import rasterio
    from affine import Affine

    from deflect import predict

    names = json.loads((so2sat / "default_partition.json").read_text())["test"]
    tiles = []
    for name in names:
        with h5py.File(so2sat / f"{name}.hdf5") as f:
            tiles.append(np.stack([f[c][()] for c in CHANNELS]))
    scene = np.concatenate([np.concatenate(tiles[:3], axis=2), np.concatenate(tiles[3:], axis=2)],
                           axis=1)  # fmt: skip  # (10, 32, 48)
    path = tmp_path / "scene.tif"
    transform = north_up(600000, 5000000, 10, 10)
    write_tif(path, scene, list(CHANNELS.values()), crs="EPSG:32631", transform=transform)
    predictor = predict.load_predictor(so2sat_run, device="cpu")
    out = predict.predict_scene(predictor, path, tmp_path / "maps", probabilities=True,
                                progress=False)  # fmt: skip
    rows = {r["sample"]: r for r in csv.DictReader(open(so2sat_run / "predictions.csv"))}
    with rasterio.open(out.prediction) as src:
        classes = src.read(1)
        assert src.shape == (2, 3) and src.transform == transform @ Affine.scale(16)
        assert src.crs.to_epsg() == 32631
        assert src.tags(1)["2"] == CLASSES[2] and src.tags(1)["255"] == "no data"
        assert src.colormap(1)[1][:3] == tuple(PALETTE[1].tolist())  # as in the pictures
    expected = np.array([[CLASSES.index(rows[n]["prediction"]) for n in names[i * 3 : i * 3 + 3]]
                         for i in range(2)])  # fmt: skip
    np.testing.assert_array_equal(classes, expected)
    with rasterio.open(out.probabilities) as src:
        probabilities = src.read()
    for i, name in enumerate(names):
        got = probabilities[:, i // 3, i % 3]
        np.testing.assert_allclose(got, [float(rows[name][f"p_{c}"]) for c in CLASSES], atol=1e-5)


def write_test_chips(so2sat, folder) -> list[str]:
    """Every test sample of the GEO-Bench fixture written as an unlabelled 16-px GeoTIFF chip
    named after it; returns the names in the partition's order."""
    import h5py

    names = json.loads((so2sat / "default_partition.json").read_text())["test"]
    for name in names:
        with h5py.File(so2sat / f"{name}.hdf5") as f:
            image = np.stack([f[c][()] for c in CHANNELS])
        write_tif(folder / f"{name}.tif", image, list(CHANNELS.values()), georeferenced=False)
    return names


def test_predict_classifies_chips_into_one_table_as_evaluation_does(so2sat, so2sat_run, tmp_path):
    """Issue 26.1 and chip inference: the run's test samples as unlabelled 16-px chips (the run
    was trained at img_size 32). predict.py classifies each chip whole, resized to 32 px as
    evaluation resizes it, into one CSV: the class and every probability equal
    predictions.csv's on every test chip."""
    from deflect import predict

    names = write_test_chips(so2sat, tmp_path / "chips")
    predictor = predict.load_predictor(so2sat_run, device="cpu")
    assert predictor.tile == (16, 16) and predictor.window == 32  # the recorded chip size
    written = predict.predict_scenes(predictor, [tmp_path / "chips"], tmp_path / "out",
                                     progress=False)  # fmt: skip
    assert [w.prediction.name for w in written] == ["predictions.csv"]  # one table, no rasters
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["predictions.csv"]
    expected = {r["sample"]: r for r in csv.DictReader(open(so2sat_run / "predictions.csv"))}
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert list(rows[0]) == ["chip", "prediction", *(f"p_{c}" for c in CLASSES)]
    assert [r["chip"] for r in rows] == [f"{n}.tif" for n in names]
    for row, name in zip(rows, names):
        assert row["prediction"] == expected[name]["prediction"], name
        for c in CLASSES:
            assert float(row[f"p_{c}"]) == pytest.approx(float(expected[name][f"p_{c}"]),
                                                         abs=2e-6), (name, c)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bigearthnet", "chips_folders", "chips_csv_multi_label"])
def test_classification_runs_from_the_command_line(case, chips_run, tmp_path):
    """Multi-label GEO-Bench (m-bigearthnet), and your own chips in both label layouts: a run,
    its metrics and predictions.csv, and eval_dir giving the same numbers."""
    if case == "bigearthnet":
        task = OmegaConf.load(REPO / "configs" / "dataset" / "m_bigearthnet.yaml")
        root = write_geobench(tmp_path / "m-bigearthnet", [f"l{i}" for i in range(6)],
                              {"train": 10, "valid": 3, "test": 4}, multi_label=True,
                              channels=list(task.channels))  # fmt: skip
        args = ["dataset=m_bigearthnet", f"dataset.root={root}"]
    elif case == "chips_folders":  # the shared chip classifier (trained one epoch)
        root, args = chips_run[0], None
    else:
        root = write_chips(tmp_path / "chips", CLASSES, layout="csv", multi_label=True)
        args = ["dataset=chips", f"dataset.root={root}", "dataset.labels=labels.csv",
                "dataset.multi_label=true", "dataset.reflectance_scale=10000"]  # fmt: skip
    work_dir = tmp_path / "run"
    if args is None:
        work_dir = copy_run(chips_run[1], tmp_path)  # eval_dir below writes into it
    else:
        run_cli([*TINY, *args, "img_size=16", "epochs=2", f"work_dir={work_dir}"], tmp_path)
    metrics = json.loads((work_dir / "test_metrics.json").read_text())
    multi = case != "chips_folders"
    assert ("mAP" in metrics and "microF1" in metrics) == multi
    rows = list(csv.DictReader(open(work_dir / "predictions.csv")))
    assert len(rows) == metrics["samples"] and rows
    run_cli([f"eval_dir={work_dir}"], tmp_path)
    again = json.loads((work_dir / "test_metrics.json").read_text())
    assert again["mF1"] == metrics["mF1"] and again["per_class"] == metrics["per_class"]
    if case == "bigearthnet":
        return
    # predict.py on the test chips, unlabelled: one table with predictions.csv's classes (a
    # 0/1 column per label for multi-label) and probabilities.
    inputs = ([str(p) for p in sorted((root / "test").iterdir())] if case == "chips_folders"
              else [str(root / "images"), "--pattern", "*_test_*"])  # fmt: skip
    cmd = [sys.executable, str(REPO / "scripts" / "predict.py"), str(work_dir), *inputs, "--out",
           str(tmp_path / "table"), "--chips", "--device", "cpu", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = list(csv.DictReader(open(tmp_path / "table" / "predictions.csv")))
    classes = sorted(CLASSES)
    assert len(table) == len(rows)
    for row in table:
        (evaluated,) = [r for r in rows if r["sample"].endswith(row["chip"][: -len(".tif")])]
        assert row["prediction"] == evaluated["prediction"]
        if multi:
            assert [c for c in classes if row[c] == "1"] == [
                c for c in evaluated["prediction"].split(";") if c
            ]
        for c in classes:
            assert float(row[f"p_{c}"]) == pytest.approx(float(evaluated[f"p_{c}"]), abs=2e-6)


def test_explain_on_a_classification_run_starts_from_its_test_mf1(so2sat_run):
    """scripts/explain.py on a GEO-Bench DEFLECT run: the baseline is the run's own test mF1,
    exactly; every band of the run is occluded at the input, and each of DEFLECT's spectral
    indices inside its patch embedding; the deflection statistics cover the adapted blocks."""
    from deflect.engine.explain import explain_run

    report = explain_run(so2sat_run, "test", "cpu")
    test = json.loads((so2sat_run / "metrics.json").read_text())["test"]
    assert report["metric"] == "mF1" and report["baseline"]["mF1"] == test["mF1"]
    saved = json.loads((so2sat_run / "adapter" / "default" / "deflect_config.json").read_text())
    kinds = {}
    for row in report["importance"]:
        kinds.setdefault(row["kind"], []).append(row["input"])
    # Rows are sorted by drop: every input once, in any order.
    assert sorted(kinds["band"]) == sorted(CHANNELS.values())
    assert sorted(kinds["feature"]) == sorted(list(CHANNELS.values()) + saved["indices"])
    assert len(report["deflection"]) == len(saved["target_blocks"])
    assert "diagnostics (test): drop of mF1" in (so2sat_run / "train.log").read_text()


def test_a_chip_classifier_evaluates_on_landsat8_chips_through_the_band_mapping(chips_run,
                                                                                tmp_path):  # fmt: skip
    """A classifier trained on Sentinel-2 chips (B2, B3, B4, B8), evaluated on the same test
    chips written as Landsat 8 files (NIR named B5): ``eval_dir=<run> dataset=chips
    dataset.sensor=landsat8`` maps B8 <- B5 by wavelength and gives the run's own confusion
    matrix; the results go beside the run's, under cross_sensor/chips_landsat8/ (the dataset
    config's name), and nothing is written into the Landsat folder."""
    root, work_dir = chips_run[0], copy_run(chips_run[1], tmp_path)  # evaluated into
    common = ["dataset=chips", "dataset.reflectance_scale=10000"]
    landsat = copy_with_band_names(root, tmp_path / "landsat", ("B2", "B3", "B4", "B5"))
    proc = run_cli([f"eval_dir={work_dir}", *common, f"dataset.root={landsat}",
                    "dataset.sensor=landsat8"], tmp_path)  # fmt: skip
    assert "B8    <- B5       832.8 nm <-   865.0 nm" in proc.stdout
    assert "test metrics (run on chips_landsat8, best epoch 1)" in proc.stdout
    assert not (landsat / "band_stats.json").exists()  # the run's statistics normalise
    crossed = json.loads((work_dir / "cross_sensor" / "chips_landsat8" /
                          "test_metrics.json").read_text())  # fmt: skip
    assert crossed["root"] == str(landsat.resolve()) and crossed["dataset"] == "chips"
    same = json.loads((work_dir / "test_metrics.json").read_text())
    assert [m["given"] for m in crossed["band_mapping"]] == ["B2", "B3", "B4", "B5"]
    assert crossed["samples"] == same["samples"] == len(CLASSES)
    assert crossed["confusion_matrix"] == same["confusion_matrix"]


def test_explain_on_a_run_whose_data_went_bad_names_the_sample_file(so2sat, so2sat_run,
                                                                    tmp_path):  # fmt: skip
    """Issue 26.9: a test sample whose label is outside the classes fails when explain.py lists
    the split, naming the file (it failed with a reshape error after the occlusions began)."""
    import shutil

    from deflect.engine.explain import explain_run

    data = shutil.copytree(so2sat, tmp_path / "m-so2sat")
    run = shutil.copytree(so2sat_run, tmp_path / "run")
    config = (run / "config.yaml").read_text()
    assert str(so2sat) in config
    (run / "config.yaml").write_text(config.replace(str(so2sat), str(data)))
    bad = json.loads((data / "default_partition.json").read_text())["test"][2]
    with h5py_file(data / f"{bad}.hdf5") as f:
        f.attrs["pickle"] = str(pickle.dumps({"label": 7}, protocol=4))
    # Hydra's InstantiationException carries the dataset's ValueError and its message.
    with pytest.raises(Exception, match=rf"{bad}.hdf5': the label 7 is not a class id 0..2"):
        explain_run(run, "test", "cpu")


def h5py_file(path):
    import h5py

    return h5py.File(path, "r+")
