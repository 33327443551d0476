"""What a classification run does with imperfect inputs (issue 26): settings checked before
anything is built, chips and CSVs read as their authors meant them or refused naming the line
and the fix, GEO-Bench samples checked when the split is listed, seeded chip splits stratified
by class, images without a valid pixel never scored, and one convention for absent classes in
every macro mean. Tiny real files (4-px GeoTIFFs, CSVs, GEO-Bench fixtures); hand counts."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from datasets import ChipFolder, GeoBench
from deflect.engine.workdir import check_run_config
from deflect.tasks import ClassificationTask
from deflect.tasks.classification import ClassificationLoss
from deflect.tasks.confusion import metrics_from_confusion
from tests.conftest import REPO
from tests.fakes import CHIP_BANDS as BANDS
from tests.fakes import write_geobench
from tests.fakes import write_reflectance_chip as write_chip
from tests.test_classification import CHANNELS, CLASSES, spec


def csv_chips(root, rows: list[tuple[str, str]], header: str = "name,label",
              delimiter: str = ",", prefix: str = "") -> str:  # fmt: skip
    """Chips images/<name>.tif and labels.csv with ``rows`` (name, label[, split])."""
    for i, (name, *_) in enumerate(rows):
        if ".." not in name and not name.startswith("/"):
            write_chip(root / "images" / f"{name}.tif", seed=i)
    lines = [header] + [delimiter.join(r) for r in rows]
    (root / "labels.csv").write_text(prefix + "\n".join(lines) + "\n", encoding="utf-8")
    return str(root)


def chips(root, split: str = "train", **kwargs) -> ChipFolder:
    kwargs.setdefault("labels", "labels.csv")
    return ChipFolder(root=str(root), split=split, **kwargs)


def settings(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=["dataset=chips", "dataset.root=x", *overrides])


# ---- 3, 10: settings checked before anything is built ------------------------------------------
def test_a_switch_is_true_or_false_never_a_word_taken_as_true(tmp_path):
    """dataset.multi_label=no was a non-empty string, so true: a multi-label run."""
    with pytest.raises(ValueError, match=r"dataset.multi_label='no': expected true or false"):
        check_run_config(settings("dataset.multi_label=no"))
    with pytest.raises(ValueError, match=r"augmentation.rot90='off': expected true or false"):
        check_run_config(settings("augmentation.rot90=off"))
    assert check_run_config(settings("dataset.multi_label=true")) == []
    root = csv_chips(tmp_path, [(f"c{i}", "ab"[i % 2], "train") for i in range(4)],
                     "name,label,split")  # fmt: skip
    with pytest.raises(ValueError, match=r"dataset.multi_label='no': expected true or false"):
        chips(root, multi_label="no")  # the dataset itself, built from Python
    with pytest.raises(ValueError, match=r"task.multi_label='no': expected true or false"):
        ClassificationTask(multi_label="no")


def test_classification_settings_are_checked_before_anything_is_built():
    with pytest.raises(ValueError) as err:
        check_run_config(settings("task.threshold=abc", "task.dropout=-0.5",
                                  "loss.label_smoothing=2", "dataset.classes=forest"))  # fmt: skip
    message = str(err.value)
    assert "task.threshold='abc': expected a number in (0, 1); e.g. task.threshold=0.5" in message
    assert "task.dropout=-0.5: expected a number in [0, 1)" in message
    assert "loss.label_smoothing=2: expected a number in [0, 1)" in message
    assert "dataset.classes='forest': expected a list" in message
    with pytest.raises(ValueError, match=r"task.multi_label=true but dataset.multi_label=false: "
                       r"the dataset gives one class per image"):  # fmt: skip
        check_run_config(settings("task.multi_label=true"))
    for good in ("task.threshold=0.3", "task.dropout=0", "loss.label_smoothing=0.1",
                 "dataset.classes=[0,1,2]", "dataset.multi_label=true", "finetune=frozen"):  # fmt: skip
        assert check_run_config(settings(good)) == [], good
    with pytest.raises(ValueError, match=r"task.dropout=-0.5: expected a number in \[0, 1\)"):
        ClassificationTask(dropout=-0.5)


def test_integer_classes_match_integer_labels_and_sort_as_numbers(tmp_path):
    """dataset.classes=[0,1,2] (integers, from Hydra) against the CSV's labels "0", "1", "2";
    without classes, labels 0..10 sort as numbers, not as text (0, 1, 10, 2, ...)."""
    rows = [(f"c{i}", str(i % 11), "train") for i in range(11)]
    root = csv_chips(tmp_path / "eleven", rows, "name,label,split")
    data = chips(root)
    assert data.classes == [str(i) for i in range(11)]
    assert int(data[data.names.index("c10")]["label"]) == 10
    root = csv_chips(tmp_path / "three", [(f"c{i}", str(i % 3), "train") for i in range(6)],
                     "name,label,split")  # fmt: skip
    assert chips(root, classes=[0, 1, 2]).classes == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"dataset.classes='forest': expected a list"):
        chips(root, classes="forest")


# ---- 5: duplicate rows --------------------------------------------------------------------------
def test_a_chip_listed_twice_is_refused_naming_both_lines(tmp_path):
    rows = [("a", "forest", "train"), ("b", "water", "train"), ("c", "forest", "val"),
            ("a", "water", "test")]  # fmt: skip
    root = csv_chips(tmp_path, rows, "name,label,split")
    with pytest.raises(ValueError, match=r"lists chip 'a' twice, on lines 2 \(label 'forest', "
                       r"split train\) and 5 \(label 'water', split test\)"):  # fmt: skip
        chips(root)


# ---- 7: stratified seeded splits ----------------------------------------------------------------
def test_seeded_chip_splits_are_stratified_and_a_class_without_validation_chips_is_said(
        tmp_path, caplog):  # fmt: skip
    """60 chips, 20 per class, no split column, 10 % validation and 10 % test: 6 chips each,
    2 of every class (hand count), the same on every build; a class of 2 chips beside classes
    of 20 gets no validation chip, and a warning says so."""
    rows = [(f"{c}{i:02d}", c) for c in ("a", "b", "c") for i in range(20)]
    root = csv_chips(tmp_path / "even", rows)
    for split, n in (("val", 2), ("test", 2), ("train", 16)):
        data = chips(root, split)
        labels = [data.classes[int(data[i]["label"])] for i in range(len(data))]
        assert {c: labels.count(c) for c in "abc"} == {"a": n, "b": n, "c": n}, split
        assert chips(root, split).names == data.names  # seeded: the same every time
    rows = [(f"{c}{i:02d}", c) for c in ("a", "b") for i in range(20)] + [("r0", "r"), ("r1", "r")]
    root = csv_chips(tmp_path / "rare", rows)
    with caplog.at_level(logging.WARNING):
        chips(root)
    assert "class(es) ['r'] have no val chip: the validation metric (which chooses best.pt) " \
        "never sees them" in caplog.text  # fmt: skip


# ---- 8: names, classes, labels, empty images, metrics --------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "ABSOLUTE"])
def test_a_chip_name_leaving_the_root_is_refused(name, tmp_path):
    """A chip outside dataset.root exists and would be read; its CSV name is refused."""
    root = tmp_path / "data" / "chips"
    write_chip(tmp_path / "data" / "x.tif")  # images/../../x.tif from the root
    rows = [("a", "forest", "train"), ("b", "water", "train")]
    if name == "ABSOLUTE":  # with dataset.images={name}.tif
        name, images = str(tmp_path / "data" / "x"), "{name}.tif"
        for i, (chip, _, _) in enumerate(rows):
            write_chip(root / f"{chip}.tif", seed=i)
    else:
        images = "images/{name}.tif"
    csv_chips(root, [*rows, (name, "water", "train")], "name,label,split")
    with pytest.raises(ValueError, match=r"chip name '.*x' on line 4 of .* is empty, absolute "
                       r"or climbs out with '..'"):  # fmt: skip
        chips(root, images=images)


def test_class_names_are_stripped_and_near_duplicates_warned_about(tmp_path, caplog):
    root = tmp_path / "folders"
    for i, folder in enumerate(["forest", "forest ", "Water", "water"]):
        for split in ("train", "val", "test"):
            write_chip(root / split / folder / f"c{i}.tif", seed=i)
    with caplog.at_level(logging.WARNING):
        data = ChipFolder(root=str(root), split="train")
    assert data.classes == ["Water", "forest", "water"]  # "forest " is "forest"
    assert "classes ['Water', 'water'] differ only in case, spaces, '_' or '-'" in caplog.text


def test_a_label_that_is_not_a_whole_number_is_refused(tmp_path):
    root = csv_chips(tmp_path, [("a", "0", "train"), ("b", "1.7", "train")], "name,label,split")
    with pytest.raises(ValueError, match=r"label '1.7' of chip 'b' \(line 3 of .*labels.csv'\) "
                       r"is a number but not an integer"):  # fmt: skip
        chips(root)


def test_an_image_without_a_valid_pixel_is_never_scored(tmp_path):
    """The rule of segmentation's pixels without a valid band: its label becomes ignore_index
    (single-label) or ignore_index in every entry (multi-label); the metrics and the loss leave
    it out (hand counts without it)."""
    rows = [("a", "x", "train"), ("b", "y", "train"), ("e", "y", "train")]
    root = csv_chips(tmp_path / "single", rows, "name,label,split")
    write_chip(tmp_path / "single" / "images" / "e.tif", empty=True)
    data = chips(root)
    assert [int(data[i]["label"]) for i in range(3)] == [0, 1, -1]
    root = csv_chips(tmp_path / "multi", [("a", "x;y", "train"), ("e", "y", "train")],
                     "name,label,split")  # fmt: skip
    write_chip(tmp_path / "multi" / "images" / "e.tif", empty=True)
    multi = chips(root, multi_label=True)
    assert multi[1]["label"].tolist() == [-1.0, -1.0] and multi[0]["label"].tolist() == [1, 1]
    # Multi-label metric and loss: the ignored row changes nothing.
    task = ClassificationTask(multi_label=True)
    metric = task.metric(spec(("x", "y")), torch.device("cpu"))
    logits = torch.tensor([[2.0, -2.0], [3.0, 3.0]])
    metric.update(logits, torch.tensor([[1, 1], [-1, -1]]))
    m = metric.compute()
    assert m["samples"] == 1 and m["per_class"]["x"]["F1"] == 1.0
    assert m["per_class"]["y"]["F1"] == 0.0 and m["mF1"] == pytest.approx(0.5)
    loss = ClassificationLoss(2, multi_label=True)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:1], torch.ones(1, 2))
    torch.testing.assert_close(loss(logits, torch.tensor([[1.0, 1.0], [-1.0, -1.0]])), expected)


def test_an_image_without_a_valid_pixel_has_no_prediction_in_predictions_csv(tmp_path, caplog):
    from deflect.tasks.classification import ClassificationWriter

    rows = [("a", "x", "test"), ("e", "y", "test")]
    root = csv_chips(tmp_path, rows, "name,label,split")
    write_chip(tmp_path / "images" / "e.tif", empty=True)
    data = chips(root, "test", band_stats={"mean": dict.fromkeys(BANDS, 0.0),
                                           "std": dict.fromkeys(BANDS, 1.0)})  # fmt: skip
    task = ClassificationTask()
    writer = ClassificationWriter(data, tmp_path, 0, True, task)
    batch = {"image": torch.stack([data[0]["image"], data[1]["image"]]),
             "label": torch.tensor([0, -1]), "index": torch.tensor([0, 1])}  # fmt: skip
    output = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    with caplog.at_level(logging.WARNING):
        writer(batch, task.predict(output), output)
        writer.finish(tmp_path)
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[1].startswith("a,x,x,0.88") and lines[2] == "e,,,,"
    assert "1 of 2 test images have no valid pixel (e.g. e): not classified and not scored" \
        in caplog.text  # fmt: skip


def test_macro_means_average_exactly_the_per_class_values_shown():
    """One convention for absent classes: truth a a b b, predictions a a a c. Class b is present
    but never predicted: precision 0, shown and averaged. Class c is absent from the truth: no
    precision, recall or F1 (null), out of every mean, although it was predicted."""
    cm = torch.tensor([[2, 0, 0], [1, 0, 1], [0, 0, 0]])  # [truth, prediction]
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    per = m["per_class"]
    assert per["b"]["Precision"] == 0.0 and per["c"]["Precision"] is None
    assert per["c"]["F1"] is None and per["c"]["Recall"] is None
    assert m["mPrecision"] == pytest.approx((2 / 3 + 0) / 2)  # a: 2 of the 3 predicted a
    for key in ("Precision", "Recall", "F1"):
        shown = [v[key] for v in per.values() if v[key] is not None]
        assert m[f"m{key}"] == pytest.approx(np.mean(shown)), key
    # Multi-label, the same rule: label b has positives but is never predicted; c has none.
    metric = ClassificationTask(multi_label=True).metric(spec(), torch.device("cpu"))
    metric.update(torch.tensor([[3.0, -3.0, 3.0], [3.0, -3.0, -3.0]]),
                  torch.tensor([[1, 1, 0], [0, 1, 0]]))  # fmt: skip
    m = metric.compute()
    assert m["per_class"]["b"]["Precision"] == 0.0 and m["per_class"]["c"]["Precision"] is None
    assert m["mPrecision"] == pytest.approx((0.5 + 0.0) / 2)


def test_empty_label_sets_are_scored_as_no_label_and_an_all_empty_split_is_warned_about(
        tmp_path, caplog):  # fmt: skip
    root = csv_chips(tmp_path, [("a", "x;y", "train"), ("n", "", "train")], "name,label,split")
    with caplog.at_level(logging.WARNING):
        data = chips(root, multi_label=True)
        assert data[1]["label"].tolist() == [0.0, 0.0]
        metric = ClassificationTask(multi_label=True).metric(spec(("x", "y")),
                                                             torch.device("cpu"))  # fmt: skip
        metric.update(torch.tensor([[3.0, -3.0]]), torch.tensor([[0, 0]]))
        m = metric.compute()
    assert "1 chip(s) have an empty label set (e.g. 'n')" in caplog.text
    assert np.isnan(m["mF1"]) and m["microF1"] == 0.0  # one false positive, no true positive
    assert "no label has a positive among the 1 scored samples" in caplog.text


# ---- 9: GEO-Bench samples checked when the split is listed ---------------------------------------
def damage(root, sample: str, how: str) -> None:
    import h5py

    with h5py.File(root / f"{sample}.hdf5", "r+") as f:
        if how == "band size":
            del f["04 - Red"]
            f.create_dataset("04 - Red", data=np.zeros((5, 5), np.int16))
        else:
            label = {"outside": 5, "string": "forest", "fraction": 1.7}[how]
            f.attrs["pickle"] = str(pickle.dumps({"label": label}, protocol=4))


@pytest.mark.parametrize("how", ["band size", "outside", "string", "fraction"])
def test_a_bad_geobench_sample_is_named_when_the_split_is_listed(how, tmp_path):
    root = write_geobench(tmp_path / "task", CLASSES, {"train": 2, "valid": 1, "test": 2}, size=8)
    damage(root, "id_test_001", how)
    GeoBench(root=str(root), split="train", channels=CHANNELS)  # the other splits are fine
    expected = (r"bands stored at other sizes: \{'04 - Red': \(5, 5\)\} while the others are "
                r"\(8, 8\)" if how == "band size" else r"the label .* is not a class id 0..2 of the 3 classes")  # fmt: skip
    with pytest.raises(ValueError, match=r"id_test_001.hdf5'?: " + expected):
        GeoBench(root=str(root), split="test", channels=CHANNELS)


# ---- 11: sidecars and spreadsheets ---------------------------------------------------------------
def test_gdal_sidecars_in_a_class_folder_are_no_chips(tmp_path):
    for split in ("train", "val", "test"):
        for k, cls in enumerate(("field", "forest")):
            path = tmp_path / split / cls / "c.tif"
            write_chip(path, k)
            for sidecar in (".aux.xml", ".ovr", ".msk"):
                path.with_name(path.name + sidecar).write_text("<PAMDataset/>")
    data = ChipFolder(root=str(tmp_path), split="train")
    assert data.names == ["train/field/c", "train/forest/c"]


@pytest.mark.parametrize("flavour", ["bom", "semicolon", "tab"])
def test_a_spreadsheet_s_csv_is_read(flavour, tmp_path):
    rows = [("a", "forest", "train"), ("b", "water", "train")]
    delimiter = {"bom": ",", "semicolon": ";", "tab": "\t"}[flavour]
    csv_chips(tmp_path, rows, delimiter.join(("name", "label", "split")), delimiter,
              prefix="\ufeff" if flavour == "bom" else "")  # fmt: skip
    data = chips(tmp_path)
    assert data.names == ["a", "b"] and data.classes == ["forest", "water"]


def test_a_csv_without_the_columns_says_what_it_found(tmp_path):
    csv_chips(tmp_path, [("a", "forest")], "chip|class")
    with pytest.raises(ValueError, match=r"separated by ',', ';' or a tab; its first line is "
                       r"'chip\|class'"):  # fmt: skip
        chips(tmp_path)


# ---- what a chip user expects to be told ---------------------------------------------------------
def test_band_statistics_are_said_once_for_the_three_splits(tmp_path, caplog):
    rows = [("a", "forest", "train"), ("b", "water", "val"), ("c", "water", "test")]
    root = csv_chips(tmp_path, rows, "name,label,split")
    with caplog.at_level(logging.INFO):
        for split in ("train", "val", "test"):
            chips(root, split)
    said = [r.getMessage() for r in caplog.records if "band statistics" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("computed band statistics over 1 training chips")


def test_a_resize_of_the_chips_is_said_with_the_setting_that_avoids_it(tmp_path, caplog):
    from deflect.engine import build

    rows = [("a", "forest", "train"), ("b", "water", "val"), ("c", "water", "test")]
    root = csv_chips(tmp_path, rows, "name,label,split")
    with caplog.at_level(logging.INFO):
        for size in (224, 4):  # chips of 4 px: said at 224, silent at their own size
            build.build_dataset(settings(f"dataset.root={root}", "dataset.labels=labels.csv",
                                         f"img_size={size}"), "train")  # fmt: skip
    resized = [r.getMessage() for r in caplog.records if "resized" in r.getMessage()]
    assert resized == ["ChipFolder: images are 4x4 px (the first one read), resized to "
                       "img_size=224 (task.input=resize): set dataset.img_size=4 (or "
                       "img_size=...) to train at their own size"]  # fmt: skip
