"""Pixel-wise regression: metrics, losses, the monitor's direction and the test outputs, each
checked against numpy or torch computed here, or against the files read back."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image

from deflect.tasks.regression import (
    RegressionLoss,
    RegressionMetric,
    RegressionTask,
    RegressionWriter,
    metrics_from_sums,
    write_regression_geotiff,
)
from tests.conftest import REPO, s2_spec, tiny_encoder
from tests.fakes import north_up


def noisy_pair(seed: int, shape=(2, 2, 5, 6), nan_fraction: float = 0.3):
    """A prediction and a target ``(B, T, H, W)`` with NaN at about ``nan_fraction`` of the
    target pixels; each channel on its own scale."""
    rng = np.random.default_rng(seed)
    scales = 40.0 ** np.arange(shape[1])  # 1, 40, ...
    target = rng.normal(size=shape) * scales[None, :, None, None] + 3
    prediction = target + rng.normal(size=shape) * 0.5 + 0.2
    target[rng.random(shape) < nan_fraction] = np.nan
    return prediction.astype(np.float32), target.astype(np.float32)


def numpy_metrics(prediction: np.ndarray, target: np.ndarray, t: int) -> dict:
    """Target ``t``'s metrics written out from their definitions, over its finite targets."""
    y = target[:, t].astype(np.float64).ravel()
    p = prediction[:, t].astype(np.float64).ravel()
    valid = np.isfinite(y)
    y, p = y[valid], p[valid]
    e = p - y
    return {
        "rmse": float(np.sqrt(np.mean(e**2))),
        "mae": float(np.mean(np.abs(e))),
        "bias": float(np.mean(e)),
        "r2": float(1 - np.sum(e**2) / np.sum((y - y.mean()) ** 2)),
        "pixels": int(valid.sum()),
    }


def assert_metrics(result: dict, prediction: np.ndarray, target: np.ndarray, names) -> None:
    for t, name in enumerate(names):
        expected = numpy_metrics(prediction, target, t)
        got = result["per_target"][name]
        assert got["pixels"] == expected["pixels"]
        for key in ("rmse", "mae", "bias", "r2"):
            assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), (name, key)
    for key in ("rmse", "mae", "bias", "r2"):
        mean = np.mean([numpy_metrics(prediction, target, t)[key] for t in range(len(names))])
        assert result[key] == pytest.approx(mean, rel=1e-9)


def test_metrics_over_batches_equal_numpy_on_the_whole_evaluation():
    names = ["height", "biomass"]
    batches = [noisy_pair(seed) for seed in (1, 2, 3)]
    metric = RegressionMetric(names)
    for prediction, target in batches:
        metric.update(torch.from_numpy(prediction), torch.from_numpy(target))
    union = [np.concatenate(parts) for parts in zip(*batches)]
    assert_metrics(metric.compute(), *union, names)


def test_sums_of_two_ranks_added_give_the_metrics_of_their_union():
    names = ["height", "biomass"]
    shards = [noisy_pair(10), noisy_pair(11, shape=(3, 2, 4, 4), nan_fraction=0.5)]
    ranks = [RegressionMetric(names) for _ in shards]
    for rank, (prediction, target) in zip(ranks, shards):
        rank.update(torch.from_numpy(prediction), torch.from_numpy(target))
    added = ranks[0].sums + ranks[1].sums
    # The union of the shards' pixels, as one (1, T, pixels, 1) array each.
    union = [np.concatenate([s[i].transpose(1, 0, 2, 3).reshape(2, -1) for s in shards], axis=1)
             [None, :, :, None] for i in (0, 1)]  # fmt: skip
    assert_metrics(metrics_from_sums(added, names), *union, names)


def test_r2_is_one_for_a_perfect_prediction_and_zero_for_the_evaluation_mean():
    _, target = noisy_pair(4, shape=(4, 1, 8, 8))
    halves = [torch.from_numpy(target[:2]), torch.from_numpy(target[2:])]
    perfect = RegressionMetric(["y"])
    mean = RegressionMetric(["y"])
    overall = float(np.nanmean(target))  # the mean of the whole evaluation, not of a batch
    for half in halves:
        perfect.update(half.clone(), half)
        mean.update(torch.full_like(half, overall), half)
    assert perfect.compute()["r2"] == 1.0 and perfect.compute()["rmse"] == 0.0
    assert mean.compute()["r2"] == pytest.approx(0.0, abs=1e-9)


def test_a_target_without_valid_pixels_has_no_metrics_and_stays_out_of_the_means():
    prediction, target = noisy_pair(5)
    target[:, 1] = np.nan
    metric = RegressionMetric(["height", "biomass"])
    metric.update(torch.from_numpy(prediction), torch.from_numpy(target))
    result = metric.compute()
    assert result["per_target"]["biomass"] == {"rmse": None, "mae": None, "r2": None,
                                               "bias": None, "pixels": 0}  # fmt: skip
    assert result["rmse"] == pytest.approx(numpy_metrics(prediction, target, 0)["rmse"])
    assert result["pixels"] == int(np.isfinite(target).sum())


def test_the_declared_directions_prefer_the_better_prediction():
    """For every monitor, the task's direction ranks a prediction with a tenth of the error
    above the noisier one; the default monitor is rmse, which is lower-is-better."""
    rng = np.random.default_rng(6)
    target = rng.normal(size=(2, 1, 16, 16)).astype(np.float32)
    noise = rng.normal(size=target.shape).astype(np.float32)
    scores = {}
    for label, scale in (("good", 0.1), ("bad", 1.0)):
        metric = RegressionMetric(["y"])
        metric.update(torch.from_numpy(target + scale * noise), torch.from_numpy(target))
        scores[label] = metric.compute()
    task = RegressionTask(targets=["y"])
    assert task.headline == "rmse"
    for monitor in task.monitors:
        good, bad = scores["good"][monitor], scores["bad"][monitor]
        assert task.better(monitor, good, bad) and not task.better(monitor, bad, good), monitor


@pytest.mark.parametrize(
    "name, reference",
    [
        ("l1", lambda p, y: F.l1_loss(p, y)),
        ("mse", lambda p, y: F.mse_loss(p, y)),
        ("huber", lambda p, y: F.huber_loss(p, y, delta=0.5)),
    ],
)
def test_losses_equal_torch_on_the_valid_subset(name, reference):
    prediction, target = noisy_pair(7)
    p, y = torch.from_numpy(prediction), torch.from_numpy(target)
    valid = torch.isfinite(y)
    loss = RegressionLoss(name, delta=0.5)(p, y)
    assert float(loss) == pytest.approx(float(reference(p[valid], y[valid])), rel=1e-6)


def test_target_weights_weigh_each_targets_values():
    prediction, target = noisy_pair(8)
    p, y = torch.from_numpy(prediction), torch.from_numpy(target)
    weights = [0.25, 2.0]
    terms, totals = [], []
    for t, w in enumerate(weights):
        valid = torch.isfinite(y[:, t])
        terms.append(w * F.mse_loss(p[:, t][valid], y[:, t][valid], reduction="sum"))
        totals.append(w * valid.sum())
    expected = sum(terms) / sum(totals)
    loss = RegressionLoss("mse", target_weights=weights)(p, y)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_gradients_are_zero_at_nan_targets_and_a_batch_without_targets_gives_zero():
    prediction, target = noisy_pair(9)
    p = torch.from_numpy(prediction).requires_grad_()
    y = torch.from_numpy(target)
    RegressionLoss("mse")(p, y).backward()
    valid = torch.isfinite(y)
    assert torch.all(p.grad[~valid] == 0)
    expected = 2 * (p.detach() - y)[valid] / valid.sum()  # d/dp of the mean of squares
    assert torch.allclose(p.grad[valid], expected, rtol=1e-5, atol=1e-7)

    p.grad = None
    loss = RegressionLoss("huber")(p, torch.full_like(y, float("nan")))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(p.grad == 0)


def test_bad_loss_settings_name_the_key():
    with pytest.raises(ValueError, match="loss.name='l3'"):
        RegressionLoss("l3")
    with pytest.raises(ValueError, match="loss.delta=0"):
        RegressionLoss("huber", delta=0)
    with pytest.raises(ValueError, match="2 weights for 3 targets"):
        RegressionLoss("l1", target_weights=[1, 1])(
            torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
        )


def test_a_task_without_target_names_says_how_to_name_them():
    with pytest.raises(ValueError, match=r"task.targets=\[ndvi\]"):
        RegressionTask().target_names(s2_spec(["B2", "B3", "B4"]))
    with pytest.raises(ValueError, match=r"task.targets=\[ndvi\]"):
        RegressionTask().infer(None, torch.zeros(1, 3, 8, 8), {}, None, 0)
    with pytest.raises(ValueError, match="task.targets='ndvi'"):
        RegressionTask(targets="ndvi")
    with pytest.raises(ValueError, match="task.nodata=nan"):
        RegressionTask(targets=["ndvi"], nodata=float("nan"))


class Chips:
    """A stand-in for the regression dataset (not yet written): what the writer asks of it."""

    def __init__(self, spec, crs, transforms):
        self.spec, self.crs, self.transforms = spec, crs, transforms

    def georeference(self, index):
        return self.crs, self.transforms[index]

    def sample_name(self, index):
        return f"chip_{index}"


def run_writer(tmp_path, num_panels=2, size=32, finish=True):
    """Three 32-px samples through the writer (GeoTIFFs; pictures when ``finish``); their
    arrays."""
    spec = s2_spec(["B2", "B3", "B4"])
    transforms = [north_up(500000 + 320 * i, 4200000, 10, 10) for i in range(3)]
    dataset = Chips(spec, rasterio.crs.CRS.from_epsg(32631), transforms)
    rng = np.random.default_rng(12)
    image = rng.normal(size=(3, 3, size, size)).astype(np.float32)
    image[0, :, :4, :] = np.nan  # no band valid: no-data in the GeoTIFF
    prediction, target = noisy_pair(13, shape=(3, 2, size, size), nan_fraction=0.2)
    batch = {"image": torch.from_numpy(image), "target": torch.from_numpy(target),
             "index": torch.arange(3)}  # fmt: skip
    writer = RegressionWriter(dataset, tmp_path, ["height", "biomass"], num_panels, True, True,
                              nodata=-9999.0)  # fmt: skip
    writer(batch, torch.from_numpy(prediction), torch.from_numpy(prediction))
    if finish:
        writer.finish(tmp_path)
    return dataset, image, prediction, target


def test_prediction_geotiffs_carry_the_inputs_georeference_values_and_nodata(tmp_path):
    dataset, image, prediction, _ = run_writer(tmp_path, finish=False)
    for i in range(3):
        with rasterio.open(tmp_path / "predictions" / f"chip_{i}.tif") as src:
            assert src.crs == dataset.crs and src.transform == dataset.transforms[i]
            assert src.dtypes == ("float32", "float32") and src.nodata == -9999.0
            assert src.descriptions == ("height", "biomass")
            values = src.read()
        empty = np.isnan(image[i]).all(axis=0)
        np.testing.assert_array_equal(values[:, ~empty], prediction[i][:, ~empty])
        assert np.all(values[:, empty] == -9999.0) and empty.any() == (i == 0)


def test_a_geotiff_without_a_crs_and_an_identity_transform_has_no_georeference(tmp_path):
    from affine import Affine

    values = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    write_regression_geotiff(values, tmp_path / "a.tif", None, Affine.identity(), ["ndvi"])
    with rasterio.open(tmp_path / "a.tif") as src:
        assert src.crs is None and src.descriptions == ("ndvi",)
        np.testing.assert_array_equal(src.read(), values)


def assert_titles(description: list[str], prediction, target) -> None:
    """The scatter plot's title lines hold numpy's R², RMSE and valid pixels of each target."""
    for t, name in enumerate(["height", "biomass"]):
        expected = numpy_metrics(prediction, target, t)
        match = re.fullmatch(rf"{name}: R² (\S+), RMSE (\S+) \((\d+) px\)", description[t])
        assert match, description[t]
        assert float(match[1]) == pytest.approx(expected["r2"], abs=5e-4)
        assert float(match[2]) == pytest.approx(expected["rmse"], rel=1e-3)
        assert int(match[3]) == expected["pixels"]


def test_the_scatter_plot_is_drawn_with_the_splits_r2_and_rmse(tmp_path):
    _, _, prediction, target = run_writer(tmp_path)
    with Image.open(tmp_path / "test_scatter.png") as png:
        description = png.text["Description"].splitlines()
        pixels = np.asarray(png.convert("RGB"), dtype=np.int16)
    # Drawn, not blank: a fair share of non-white pixels, in many colours (the density).
    assert (pixels.min(axis=2) < 200).mean() > 0.05
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert_titles(description, prediction, target)


def test_the_error_map_panel_is_drawn(tmp_path):
    run_writer(tmp_path, num_panels=1)
    with Image.open(tmp_path / "test_errors.png") as png:
        pixels = np.asarray(png.convert("RGB"), dtype=np.int16)
    red = (pixels[..., 0] > 150) & (pixels[..., 2] < 100)  # RdBu_r's positive errors
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)  # and its negative ones
    assert red.sum() > 100 and blue.sum() > 100


def test_the_table_and_log_line_show_the_metrics():
    prediction, target = noisy_pair(14)
    metric = RegressionMetric(["height", "biomass"])
    metric.update(torch.from_numpy(prediction), torch.from_numpy(target))
    result = metric.compute()
    task = RegressionTask(targets=["height", "biomass"])
    text = task.table(result, "test")
    row = next(line for line in text.splitlines() if "biomass" in line)
    expected = numpy_metrics(prediction, target, 1)
    assert f"{expected['rmse']:.4g}" in row and str(expected["pixels"]) in row
    assert task.log_line(result).startswith(f"rmse {result['rmse']:.4g}")
    scalars = task.scalars("val", result)
    assert scalars["val/rmse"] == result["rmse"] and scalars["val_r2/height"] == pytest.approx(
        numpy_metrics(prediction, target, 0)["r2"])  # fmt: skip


def test_the_configs_build_the_task_its_loss_and_a_linear_upernet_regressor():
    """configs/task/regression.yaml and configs/loss/regression.yaml through Hydra; the model has
    one output per target, trains on the valid pixels, and infers a larger test image with the
    sliding window (the average of the windows: a constant output stays that constant)."""
    from hydra import compose, initialize_config_dir

    from deflect.engine.build import build_task
    from deflect.tasks.base import InferenceSettings

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "task=regression", "loss=regression", "loss.name=huber", "loss.delta=0.5",
            "task.targets=[ndvi,evi]", "segmentor.channels=16", "img_size=32",
        ])  # fmt: skip
    task = build_task(cfg)
    assert isinstance(task, RegressionTask) and task.targets == ("ndvi", "evi")
    data = s2_spec(["B2", "B3", "B4"])
    loss = task.build_loss(cfg.loss, data)
    assert (loss.name, loss.delta) == ("huber", 0.5)
    with pytest.raises(ValueError, match="loss.class_weights is no setting of a regression"):
        task.build_loss({"class_weights": None, "dice_weight": 0.0}, data)  # segmentation's
    model = task.build_model(tiny_encoder(data), data, cfg.segmentor)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    target = torch.randn(2, 2, 32, 32)
    target[:, :, :8] = float("nan")
    model.train()
    loss(model(images), target).backward()
    assert model.decode_head.classifier.weight.grad.abs().sum() > 0
    # A linear output: its bias moves every output by exactly that amount.
    model.eval()
    with torch.no_grad():
        before = task.infer(model, torch.randn(1, 3, 48, 40), {}, InferenceSettings(32), 0)
        assert before.shape == (1, 2, 48, 40)
        model.decode_head.classifier.weight.zero_()
        model.decode_head.classifier.bias.copy_(torch.tensor([-3.0, 250.0]))
        after = task.infer(model, torch.randn(1, 3, 48, 40), {}, InferenceSettings(32), 0)
    assert torch.allclose(after[:, 0], torch.tensor(-3.0)) and torch.allclose(
        after[:, 1], torch.tensor(250.0))  # fmt: skip
    assert math.isclose(float(task.predict(after)[0, 1, 0, 0]), 250.0)


def shard_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: its shard through the metric and the writer (rank 0 writes)."""
    import json
    import os
    from pathlib import Path

    import torch.distributed as dist

    from deflect.engine.distributed import DistInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        prediction, target = two_shards()[rank]
        metric = RegressionMetric(["height", "biomass"])
        metric.update(torch.from_numpy(prediction), torch.from_numpy(target))
        result = metric.compute()
        info = DistInfo(rank, 2, rank, torch.device("cpu"))
        dataset = Chips(s2_spec(["B2", "B3", "B4"]), None, [None] * 8)
        writer = RegressionWriter(dataset, Path(out), ["height", "biomass"], 0, False,
                                  rank == 0, info)  # fmt: skip
        image = torch.zeros(prediction.shape[0], 3, *prediction.shape[2:])
        batch = {"image": image, "target": torch.from_numpy(target),
                 "index": torch.arange(prediction.shape[0])}  # fmt: skip
        writer(batch, torch.from_numpy(prediction))
        writer.finish(Path(out))
        if rank == 0:
            (Path(out) / "metrics.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def two_shards():
    """Two ranks' shards of different sizes (4800 and 2400 pixels per target)."""
    return [noisy_pair(20, shape=(2, 2, 40, 60)), noisy_pair(21, shape=(1, 2, 40, 60))]


@pytest.mark.slow  # two processes start torch: about 45 s on 2 busy cores
def test_two_gloo_ranks_score_and_plot_the_union_of_their_shards(tmp_path):
    """Under DDP each rank holds a shard: the metric's all_reduce and the writer's gather give
    the metrics of the union (numpy on the concatenated shards), in the scatter plot's titles
    too."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(shard_worker, args=(port, str(tmp_path)), nprocs=2)
    prediction, target = (np.concatenate(parts) for parts in zip(*two_shards()))
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert_metrics(result, prediction, target, ["height", "biomass"])
    with Image.open(tmp_path / "test_scatter.png") as png:
        description = png.text["Description"].splitlines()
    assert_titles(description, prediction, target)


def test_the_task_takes_the_targets_named_by_the_dataset_yaml():
    from hydra import compose, initialize_config_dir

    from deflect.engine.build import build_task

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["task=regression", "+dataset.target_names=[chm]"])
    assert build_task(cfg).targets == ("chm",)
