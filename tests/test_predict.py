"""Whole-scene prediction (``deflect/predict/``, ``scripts/predict.py``) against the
whole-scene sliding window of evaluation: same map pixel for pixel, in bounded memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from omegaconf import OmegaConf

from deflect import predict
from deflect.data import invalid_to_nan
from deflect.pictures import PALETTE
from deflect.predict import reading
from deflect.tasks import Task
from deflect.tiling import sliding_window_logits
from tests.conftest import REPO, copy_run, run_cli
from tests.fakes import (
    DEMO_BANDS,
    SCENE_CRS,
    SCENE_NODATA,
    SCENE_TRANSFORM,
    copy_with_band_names,
    demo_pixels,
    write_damaged_tif,
    write_scene,
)

NODATA = SCENE_NODATA  # what demo_pixels writes
WINDOW, STRIDE = 32, 16  # TINY's img_size, and evaluation's default stride (half the window)
CRS, TRANSFORM = SCENE_CRS, SCENE_TRANSFORM  # where write_scene puts a scene


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny model gains nothing from more, and a busy 2-core machine
    slows down a lot when threads compete; the CLI subprocess runs with one too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(nodata_demo_run, tmp_path_factory) -> Path:
    """The shared tiny run (one step on the demo with a no-data value), copied: this module's
    tests evaluate into it."""
    return copy_run(nodata_demo_run, tmp_path_factory.mktemp("predict_run"))


@pytest.fixture(scope="module")
def predictor(run_dir) -> predict.Predictor:
    return predict.load_predictor(run_dir, device="cpu")


@pytest.fixture(scope="module")
def reference_model(run_dir):
    """The run's model built and loaded by the test, as ``run.py eval_dir=...`` does."""
    from deflect.engine import build
    from deflect.engine.checkpoint import load_checkpoint, load_model_state

    cfg = OmegaConf.load(run_dir / "config.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build.build_model(cfg, build.build_dataset(cfg, "test").spec)
    best = run_dir / "checkpoints" / "best.pt"
    load_model_state(model, load_checkpoint(best), str(best))
    return model.eval()


def reference(model, run_dir: Path, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluation's sliding window over the whole scene at once: logits (K, H, W), argmax, and
    the all-bands-invalid mask; normalised here with the run's config statistics."""
    stats = OmegaConf.load(run_dir / "config.yaml").dataset.band_stats
    mean = np.array([stats.mean[b] for b in DEMO_BANDS], np.float32)[:, None, None]
    std = np.array([stats.std[b] for b in DEMO_BANDS], np.float32)[:, None, None]
    x = np.where(np.isfinite(image) & (image != NODATA), image, np.nan).astype(np.float32)
    x = (x - mean) / std
    logits = sliding_window_logits(model, torch.from_numpy(x)[None], WINDOW, STRIDE, 4)[0]
    return logits.numpy(), logits.argmax(0).numpy(), np.isnan(x).all(0)


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


class Recording(torch.nn.Module):
    """The model, recording every batch it is given."""

    def __init__(self, model: torch.nn.Module, batches: list) -> None:
        super().__init__()
        self.model, self.batches = model, batches
        self.metadata_keys = ()

    def forward(self, x: torch.Tensor, **metadata: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.detach().cpu().clone())
        return self.model(x, **metadata)


def recording_predictor(predictor: predict.Predictor, batches: list) -> predict.Predictor:
    return predict.Predictor(**{**predictor.__dict__, "model": Recording(predictor.model, batches)})


# ---------------------------------------------------------------- equal to the sliding window


@pytest.mark.parametrize(
    "shape, block, batch_size",
    [((130, 75), 32, 3), ((75, 53), 48, 1), ((53, 75), 1024, 8), ((20, 45), 16, 2)],
)
def test_map_and_probabilities_equal_the_whole_scene_sliding_window(
    predictor, reference_model, run_dir, tmp_path, shape, block, batch_size
):
    image = demo_pixels(*shape)
    scene = write_scene(tmp_path / "scene.tif", image)
    out = predict.predict_scene(predictor, scene, tmp_path / "out", batch_size=batch_size,
                                block=block, probabilities=True, progress=False)  # fmt: skip
    logits, expected, invalid = reference(reference_model, run_dir, image)
    assert invalid.sum() == 3 * 4 + 2 + 3 * 6 and len(np.unique(expected[~invalid])) >= 2

    classes = read(out.prediction)[0]
    assert classes.shape == shape
    np.testing.assert_array_equal(classes[~invalid], expected[~invalid])
    assert (classes[invalid] == predict.NODATA_CLASS).all()

    probabilities = read(out.probabilities)
    softmax = torch.softmax(torch.from_numpy(logits), 0).numpy()
    np.testing.assert_allclose(probabilities[:, ~invalid], softmax[:, ~invalid], atol=1e-5)
    assert np.isnan(probabilities[:, invalid]).all()


def test_outputs_keep_the_georeference_and_are_tiled_compressed_geotiffs(predictor, tmp_path):
    scene = write_scene(tmp_path / "s.tif", demo_pixels(75, 53))
    out = predict.predict_scene(predictor, scene, tmp_path / "out", block=32,
                                probabilities=True, progress=False)  # fmt: skip
    assert out.prediction == tmp_path / "out" / "s_pred.tif"
    assert out.probabilities == tmp_path / "out" / "s_prob.tif"
    for path, count, dtype in ((out.prediction, 1, "uint8"), (out.probabilities, 4, "float32")):
        with rasterio.open(path) as src:
            assert src.crs == rasterio.crs.CRS.from_string(CRS)
            assert src.transform == TRANSFORM
            assert (src.height, src.width, src.count, src.dtypes[0]) == (75, 53, count, dtype)
            assert src.profile["tiled"] and src.block_shapes[0] == (256, 256)
            assert src.compression == rasterio.enums.Compression.deflate
            assert src.tags()["classes"] == "bare,sparse,moderate,dense"
    with rasterio.open(out.probabilities) as src:
        assert src.descriptions == ("bare", "sparse", "moderate", "dense")
    with rasterio.open(out.prediction) as src:
        assert src.nodata == 255
        # Each value explained: the class colours of the pictures, and its class name.
        colours = src.colormap(1)
        assert [colours[k][:3] for k in range(4)] == [tuple(c) for c in PALETTE[:4].tolist()]
        assert colours[255] == (0, 0, 0, 0)
        assert src.tags(1) == {"0": "bare", "1": "sparse", "2": "moderate", "3": "dense",
                               "255": "no data"}  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s_pred.tif", "s_prob.tif"]


class PixelValues:
    """The scene writer of a task the scene driver has never heard of: the averaged model output
    of every pixel, as float32 bands (NaN where every band is invalid)."""

    def prepare(self, run_dir, spec, window, source):
        return None

    def split(self, predictor, paths, chips):
        return [], list(paths)

    def write_scene(self, predictor, scene, out_dir, probabilities, progress):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{scene.path.stem}_pred.tif"
        profile = scene.profile(predictor.spec.num_classes, "float32", np.nan)
        with rasterio.open(path, "w", **profile) as dst:
            for window, logits, invalid in scene.dense_blocks(progress):
                values = logits.numpy()
                values[:, invalid] = np.nan
                dst.write(values, window=window)
        return path, None, scene.forwards


class PixelTask(Task):
    name = "pixel_values"

    def scene_writer(self):
        return PixelValues()


def test_the_driver_maps_a_scene_for_any_task_through_its_scene_writer(tmp_path):
    """A task that is neither segmentation nor classification, reached only through
    ``scene_writer``: a per-pixel linear model (1x1 convolution) over a scene with overlapping
    tiles and blocks that straddle them gives, at every pixel, the linear map of that pixel's
    normalised bands computed here with numpy (tiles averaged over equal values)."""
    from deflect.data import DataSpec

    image = demo_pixels(75, 53)
    scene = write_scene(tmp_path / "s.tif", image)
    mean = {b: float(np.nanmean(np.where(image[i] == NODATA, np.nan, image[i])))
            for i, b in enumerate(DEMO_BANDS)}  # fmt: skip
    std = {b: 100.0 + 10 * i for i, b in enumerate(DEMO_BANDS)}
    spec = DataSpec(bands=tuple(DEMO_BANDS), mean=mean, std=std, reflectance_scale=10000,
                    nodata=NODATA, classes=("a", "b"))  # fmt: skip
    torch.manual_seed(0)
    model = torch.nn.Conv2d(4, 2, 1).eval()
    predictor = predict.Predictor(model, spec, WINDOW, STRIDE, torch.device("cpu"),
                                  task=PixelTask())  # fmt: skip
    (out,) = predict.predict_scenes(predictor, [scene], tmp_path / "out", batch_size=3,
                                    block=32, progress=False)  # fmt: skip
    assert out.prediction == tmp_path / "out" / "s_pred.tif" and out.probabilities is None

    x = np.where(np.isfinite(image) & (image != NODATA), image, np.nan)
    centre, scale = (np.array(list(d.values()))[:, None, None] for d in (mean, std))
    x = (x - centre) / scale
    weight = model.weight.detach().numpy()[:, :, 0, 0]
    expected = np.einsum("kc,chw->khw", weight, x) + model.bias.detach().numpy()[:, None, None]
    got = read(out.prediction)
    assert np.isnan(expected).any() and np.isfinite(expected).mean() > 0.9
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, equal_nan=True)
    # Tile starts 0, 16, 32, 43 down and 0, 16, 21 across; blocks of 32 px meet 2, 3 and 1 of
    # them down, 3 and 2 across: each block runs the tiles it meets, (2 + 3 + 1) x (3 + 2).
    assert out.forwards == 30


class Smooth(torch.nn.Module):
    """A model whose output at a pixel depends on its neighbours (so tiles disagree at their
    edges and their average matters): invalid inputs as 0, then a 5x5 convolution."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, outputs, 5, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nan_to_num(x))


def test_a_regression_scene_is_evaluation_s_sliding_window_in_a_float_geotiff(tmp_path):
    """A regression run's scene: a float32 GeoTIFF, one band per target named after it, whose
    values are the regression task's evaluation inference (the sliding window over the whole
    normalised scene at once) and the task's no-data value where every band is invalid."""
    from deflect.data import DataSpec
    from deflect.tasks import InferenceSettings
    from deflect.tasks.regression import RegressionTask

    image = demo_pixels(75, 53)
    scene = write_scene(tmp_path / "s.tif", image)
    mean = {b: 1000.0 + 100 * i for i, b in enumerate(DEMO_BANDS)}
    std = {b: 500.0 + 10 * i for i, b in enumerate(DEMO_BANDS)}
    spec = DataSpec(bands=tuple(DEMO_BANDS), mean=mean, std=std, reflectance_scale=10000,
                    nodata=NODATA, targets=("gli", "height"))  # fmt: skip
    task, model = RegressionTask(), Smooth(2).eval()
    predictor = predict.Predictor(model, spec, WINDOW, STRIDE, torch.device("cpu"), task=task)
    out = predict.predict_scene(predictor, scene, tmp_path / "out", batch_size=3, block=32,
                                progress=False)  # fmt: skip

    x = np.where(np.isfinite(image) & (image != NODATA), image, np.nan)
    centre, scale = (np.array(list(d.values()))[:, None, None] for d in (mean, std))
    x = torch.from_numpy(((x - centre) / scale).astype(np.float32))[None]
    settings = InferenceSettings(WINDOW, STRIDE)
    expected = task.infer(model, x, {}, settings, spec)[0].detach().numpy()
    invalid = torch.isnan(x[0]).all(0).numpy()
    assert invalid.sum() == 3 * 4 + 2 + 3 * 6
    with rasterio.open(out.prediction) as src:
        got = src.read()
        assert src.dtypes == ("float32", "float32") and src.nodata == task.nodata
        assert src.descriptions == ("gli", "height") and src.tags()["targets"] == "gli,height"
        assert src.transform == TRANSFORM
    np.testing.assert_allclose(got[:, ~invalid], expected[:, ~invalid], rtol=1e-5, atol=1e-5)
    assert (got[:, invalid] == task.nodata).all()


# ----------------------------------------------------------------------- bands and run folders


def test_bands_are_picked_by_name_whatever_the_file_order(predictor, tmp_path):
    image = demo_pixels(53, 40)
    expected = read(predict.predict_scene(predictor, write_scene(tmp_path / "a.tif", image),
                                          tmp_path, block=32, progress=False).prediction)  # fmt: skip
    order = [3, 0, 2, 1]  # B8, B2, B4, B3, named B08, B02, ... (canonical names match)
    names = ["B08", "B02", "B04", "B03"]
    extra = np.concatenate([image[order], image[:1] * 0 + 7])  # and a band the model ignores
    scene = write_scene(tmp_path / "b.tif", extra, names + ["B11"])
    got = read(predict.predict_scene(predictor, scene, tmp_path, block=32,
                                     progress=False).prediction)  # fmt: skip
    np.testing.assert_array_equal(got, expected)
    # Unnamed bands, named on the command line instead.
    scene = write_scene(tmp_path / "c.tif", image[order], names=None)
    got = read(predict.predict_scene(predictor, scene, tmp_path, block=32, progress=False,
                                     bands=["B8", "B2", "B4", "B3"]).prediction)  # fmt: skip
    np.testing.assert_array_equal(got, expected)


def test_unnamed_bands_of_the_model_count_are_taken_in_training_order(predictor, caplog):
    spec = predictor.spec
    assert predict.select_bands(4, [None] * 4, spec) == [1, 2, 3, 4]
    assert "assuming the training order" in caplog.text
    with pytest.raises(ValueError, match="5 bands without names.*--bands"):
        predict.select_bands(5, [None] * 5, spec)
    with pytest.raises(ValueError, match="--bands names 3 bands"):
        predict.select_bands(4, [None] * 4, spec, bands=["B2", "B3", "B4"])


def test_a_scene_missing_a_band_is_refused_by_name(predictor, tmp_path):
    scene = write_scene(tmp_path / "s.tif", demo_pixels(40, 40)[:3], ["B2", "B3", "B4"])
    with pytest.raises(ValueError, match=r"lacks bands \['B8'\].*\['B2', 'B3', 'B4'\]"):
        predict.predict_scene(predictor, scene, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "s_pred.tif").exists()


def test_run_folders_without_a_best_checkpoint_or_config_are_refused(run_dir, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_dir / "config.yaml", unfinished)
    with pytest.raises(FileNotFoundError, match=r"no checkpoints/best.pt.*resume=true work_dir="):
        predict.load_predictor(unfinished)
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        predict.load_predictor(tmp_path)
    assert predict.resolve_run_dir(run_dir / "adapter") == run_dir
    assert predict.resolve_run_dir(run_dir / "adapter" / "default") == run_dir


def test_a_scene_in_another_reflectance_scale_is_warned_about(predictor, tmp_path):
    image = demo_pixels(40, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right scale: no warning
        predict.predict_scene(predictor, write_scene(tmp_path / "ok.tif", image), tmp_path,
                              progress=False)  # fmt: skip
    scaled = np.where(image == NODATA, NODATA, image / 10000)  # float reflectance, not x10000
    with pytest.warns(UserWarning, match=r"reflectance.*B2.*reflectance_scale=10000"):
        predict.predict_scene(predictor, write_scene(tmp_path / "f.tif", scaled), tmp_path,
                              progress=False)  # fmt: skip


def test_a_dark_scene_at_the_right_scale_is_not_warned_about_but_one_at_the_wrong_scale_is(
    tmp_path,
):
    """The datasets' reflectance rule (:func:`deflect.rasters.implausible_reflectance`), not a
    comparison with the training means: a lake (reflectance 0.005 .. 0.012) for a model of
    float reflectance trained on bright fields (means 0.30 .. 0.40, 25x to 80x brighter) is
    plausible; the same lake stored x10000 is not, unless its scale is given."""
    from deflect.data import DataSpec

    lake = np.array([0.012, 0.010, 0.008, 0.005], np.float32)[:, None, None]
    noise = np.random.default_rng(0).uniform(0.9, 1.1, (4, 40, 40)).astype(np.float32)
    image = lake * noise
    mean = dict(zip(DEMO_BANDS, (0.30, 0.32, 0.34, 0.40)))
    std = dict.fromkeys(DEMO_BANDS, 0.1)
    spec = DataSpec(bands=tuple(DEMO_BANDS), mean=mean, std=std, reflectance_scale=1,
                    nodata=NODATA, classes=("a", "b"))  # fmt: skip
    torch.manual_seed(0)
    predictor = predict.Predictor(torch.nn.Conv2d(4, 2, 1).eval(), spec, WINDOW, STRIDE,
                                  torch.device("cpu"))  # fmt: skip
    dark = write_scene(tmp_path / "lake.tif", image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right scale, however dark: no warning
        predict.predict_scenes(predictor, [dark], tmp_path / "a", progress=False)
    stored = write_scene(tmp_path / "lake_x10000.tif", image * 10000)
    with pytest.warns(UserWarning, match=r"another reflectance scale.*B2 120.*the model expects "
                      r"reflectance_scale=1 "):  # fmt: skip
        predict.predict_scenes(predictor, [stored], tmp_path / "b", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its scale given: converted, and judged in its units
        predict.predict_scenes(predictor, [stored], tmp_path / "c", progress=False,
                               reflectance_scale=10000)  # fmt: skip
    np.testing.assert_array_equal(read(tmp_path / "c" / "lake_x10000_pred.tif"),
                                  read(tmp_path / "a" / "lake_pred.tif"))  # fmt: skip


def test_nodata_is_compared_in_the_file_dtype():
    raw = np.array([16777216, 16777217, 5], dtype=np.int32)  # equal in float32, not in int32
    out = invalid_to_nan(raw, 16777216)
    assert np.isnan(out[0]) and out[1] == np.float32(16777217) and out[2] == 5
    out = invalid_to_nan(np.array([np.inf, 1.0], np.float32), None)
    assert np.isnan(out[0]) and out[1] == 1


# ---------------------------------------------------------------------------- bounded memory


def test_reads_and_batches_stay_bounded_by_the_block_not_the_scene(
    predictor, reference_model, run_dir, tmp_path, monkeypatch
):
    block, batch_size = 32, 3
    image = demo_pixels(130, 75)
    scene = write_scene(tmp_path / "s.tif", image)
    reads, batches = [], []
    original_read = rasterio.io.DatasetReader.read

    def recording_read(self, *args, **kwargs):
        out = original_read(self, *args, **kwargs)
        reads.append(out.shape[-2:])
        return out

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", recording_read)
    monkeypatch.setattr(reading, "SCALE_CHECK_SIZE", 24)  # the decimated read of the scale check
    recording = recording_predictor(predictor, batches)
    out = predict.predict_scene(recording, scene, tmp_path, batch_size=batch_size, block=block,
                                progress=False)  # fmt: skip
    monkeypatch.undo()

    # The tiles meeting a block start less than a window before it and, with a stride of half
    # the window, end less than a window plus a stride after it.
    bound = block + WINDOW + STRIDE
    assert bound < 130 and len(reads) > 10
    assert max(h for h, _ in reads) <= bound and max(w for _, w in reads) <= bound
    assert max(len(b) for b in batches) == batch_size
    assert all(b.shape[1:] == (4, WINDOW, WINDOW) for b in batches)
    # Every tile of the global grid was run (border tiles more than once), and nothing else.
    assert sum(len(b) for b in batches) == out.forwards >= 8 * 5
    _, expected, invalid = reference(reference_model, run_dir, image)
    np.testing.assert_array_equal(read(out.prediction)[0][~invalid], expected[~invalid])


def test_a_scene_smaller_than_the_window_is_padded_with_nan_as_evaluation_pads(predictor, tmp_path):
    image = demo_pixels(20, 45)  # 20 rows: the window (32) overhangs the bottom by 12
    batches: list[torch.Tensor] = []
    predict.predict_scene(recording_predictor(predictor, batches),
                          write_scene(tmp_path / "s.tif", image), tmp_path, progress=False)  # fmt: skip
    tiles = torch.cat(batches)
    assert tiles.shape == (2, 4, WINDOW, WINDOW)  # columns 0 and 13 (flush with the edge)
    assert torch.isnan(tiles[:, :, 20:]).all() and torch.isfinite(tiles[:, :, :20]).any()


def test_blocks_are_rounded_to_the_stride_and_cover_the_scene_once():
    assert predict.round_block(1000, 16) == 992 and predict.round_block(5, 16) == 16
    seen = np.zeros((70, 45), int)
    for y0, y1, x0, x1 in predict.blocks(70, 45, 32):
        seen[y0:y1, x0:x1] += 1
    assert (seen == 1).all()


# ----------------------------------------------------------------- many scenes and the CLI


def test_folders_are_listed_and_ranks_share_the_scenes(predictor, tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    for name in ("a", "b", "c"):
        write_scene(folder / f"{name}.tif", demo_pixels(20, 20))
    (folder / "a_pred.tif").write_bytes(b"")  # an earlier output: skipped
    (folder / "notes.txt").write_text("x")
    assert [p.name for p in predict.list_scenes([folder])] == ["a.tif", "b.tif", "c.tif"]
    outs = predict.predict_scenes(predictor, [folder], tmp_path / "out", progress=False,
                                  rank=1, world_size=2)  # fmt: skip
    assert [o.prediction.name for o in outs] == ["b_pred.tif"]
    with pytest.raises(ValueError, match="same name"):
        predict.list_scenes([folder / "a.tif", folder / "a.tif"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict.list_scenes([tmp_path / "missing.tif"])


def test_a_scene_with_unreadable_pixels_is_named(predictor, tmp_path):
    path = tmp_path / "broken.tif"
    pixels = np.random.default_rng(0).random((4, 40, 40), np.float32) * 3000
    write_damaged_tif(path, pixels, DEMO_BANDS, slice(200, 20000))
    with pytest.raises(OSError, match=r"cannot read pixels of .*broken.tif"):
        predict.predict_scene(predictor, path, tmp_path / "out", progress=False)


def test_a_scene_declaring_its_own_no_data_value_is_predicted_without_it(predictor, tmp_path):
    """The scene's declared no-data value is honoured as training honours its files' value:
    written as 255, whatever the training no-data value was."""
    image = demo_pixels(24, 24)
    image[:, :5, :5] = 0.0
    scene = write_scene(tmp_path / "zeros.tif", image)
    with rasterio.open(scene, "r+") as dst:
        dst.nodata = 0
    out = predict.predict_scene(predictor, scene, tmp_path / "out", progress=False)
    assert (read(out.prediction)[0, :5, :5] == 255).all()


def test_a_folder_in_the_training_layout_gives_its_images_not_its_masks(predictor, run_dir,
                                                                          tmp_path):  # fmt: skip
    folder = tmp_path / "train"
    folder.mkdir()
    for name in ("x", "y"):
        write_scene(folder / f"{name}_image.tif", demo_pixels(20, 20))
        write_scene(folder / f"{name}_mask.tif", np.zeros((1, 20, 20), np.uint8), None)
    assert predictor.file_patterns == ("*_image.tif", "*_mask.tif")  # the demo's layout
    found = predict.list_scenes([folder], None, predictor.file_patterns)
    assert [p.name for p in found] == ["x_image.tif", "y_image.tif"]
    assert [p.name for p in predict.list_scenes([folder], "y_*")] == ["y_image.tif", "y_mask.tif"]
    other = tmp_path / "scenes"
    other.mkdir()
    write_scene(other / "scene.tif", demo_pixels(20, 20))  # not that layout: every GeoTIFF
    assert predict.list_scenes([other], None, predictor.file_patterns) == [other / "scene.tif"]
    cmd = [sys.executable, str(REPO / "scripts" / "predict.py"), str(run_dir), str(folder),
           "--out", str(tmp_path / "maps"), "--device", "cpu", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "maps").glob("*.tif")) == [
        "x_image_pred.tif",
        "y_image_pred.tif",
    ]  # the command line too: masks left out


def test_evaluation_and_whole_scene_prediction_agree_where_no_band_has_data(
    run_dir, predictor, demo_root, tmp_path
):
    """One rule for pixels without a valid band, in both: never scored, written as 255. A test
    tile gets labelled pixels of no-data in every band; ``eval_dir`` (a command line) and
    predict.py then give the same map pixel for pixel, and the metrics count the rest."""
    data = tmp_path / "demo"
    shutil.copytree(demo_root, data)
    tile = sorted((data / "test").glob("*_image.tif"))[0]
    with rasterio.open(tile) as src:
        image, profile, names = src.read().astype(np.float32), src.profile, src.descriptions
    image[:, 5:15, 20:40] = NODATA
    profile.update(dtype="float32")
    with rasterio.open(tile, "w", **profile) as dst:
        dst.write(image)
        dst.descriptions = names
    labelled = 0
    for mask_path in sorted((data / "test").glob("*_mask.tif")):
        with rasterio.open(mask_path) as src:
            mask = src.read(1)
        labelled += int((mask < 4).sum())
        if mask_path.name == tile.name.replace("_image", "_mask"):
            block = int((mask[5:15, 20:40] < 4).sum())
    assert block > 0
    run_cli([f"eval_dir={run_dir}", f"dataset.root={data}", "save_predictions=true"], tmp_path)
    evaluated = read(run_dir / "predictions" / tile.name.replace("_image", ""))[0]
    scene = predict.predict_scene(predictor, tile, tmp_path / "pred", progress=False)
    np.testing.assert_array_equal(evaluated, read(scene.prediction)[0])
    assert (evaluated[5:15, 20:40] == 255).all() and (evaluated != 255).sum() == 64 * 64 - 200
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics["pixels"] == labelled - block


def test_cli_writes_what_the_library_writes(predictor, run_dir, tmp_path):
    scene = write_scene(tmp_path / "s.tif", demo_pixels(53, 40))
    expected = predict.predict_scene(predictor, scene, tmp_path / "lib", block=32,
                                     probabilities=True, progress=False)  # fmt: skip
    cmd = [sys.executable, str(REPO / "scripts" / "predict.py"), str(run_dir / "adapter"),
           str(tmp_path / "s.tif"), "--out", str(tmp_path / "cli"), "--block", "32",
           "--probabilities", "--device", "cpu", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    np.testing.assert_array_equal(read(tmp_path / "cli" / "s_pred.tif"),
                                  read(expected.prediction))  # fmt: skip
    np.testing.assert_allclose(read(tmp_path / "cli" / "s_prob.tif"),
                               read(expected.probabilities), atol=1e-6)  # fmt: skip


def test_a_sentinel2_run_evaluates_on_landsat8_bands_through_the_mapping(run_dir, demo_root,
                                                                         tmp_path):  # fmt: skip
    """The demo's tiles rewritten as Landsat 8 files (B2, B3, B4 and B5 for NIR, named as
    Landsat names them): ``eval_dir=<run> dataset=folder dataset.sensor=landsat8`` maps B8 <- B5
    by wavelength, prints the table, records it and the folder it evaluated under
    ``cross_sensor/folder_landsat8/`` (the dataset config's name), writes nothing into that
    folder (the run's own statistics normalise: no band_stats.json), and scores exactly what
    the Sentinel-2 files score; without B5 the missing counterpart is named."""
    landsat = copy_with_band_names(demo_root, tmp_path / "landsat", ("B2", "B3", "B4", "B5"))
    before = sorted(p.relative_to(landsat) for p in landsat.rglob("*"))
    args = [f"eval_dir={run_dir}", "dataset=folder", f"dataset.root={landsat}",
            "dataset.sensor=landsat8", "dataset.classes=[bare,sparse,moderate,dense]",
            "dataset.ignore_index=255", "dataset.reflectance_scale=10000", "num_vis=0",
            "save_predictions=false"]  # fmt: skip
    proc = run_cli(args, tmp_path)
    assert "B8    <- B5       832.8 nm <-   865.0 nm" in proc.stdout
    assert sorted(p.relative_to(landsat) for p in landsat.rglob("*")) == before  # no band_stats
    out = run_dir / "cross_sensor" / "folder_landsat8" / "test_metrics.json"
    crossed = json.loads(out.read_text())
    assert crossed["dataset"] == "folder" and crossed["root"] == str(landsat.resolve())
    assert [m["given"] for m in crossed["band_mapping"]] == ["B2", "B3", "B4", "B5"]
    assert crossed["sensor"] == "landsat8" and crossed["trained_sensor"] == "sentinel2a"
    same = json.loads((run_dir / "metrics.json").read_text())["test"]  # the Sentinel-2 tiles
    assert crossed["confusion_matrix"] == same["confusion_matrix"]
    from deflect.data import map_bands

    with pytest.raises(ValueError, match=r"no counterpart for B8 \(833 nm, 106 nm wide\)"):
        map_bands(DEMO_BANDS, "sentinel2a", ["B2", "B3", "B4", "B6"], "landsat8")  # no NIR
    mapped = map_bands(DEMO_BANDS, "sentinel2a", ["B5", "B4", "B2", "B3"], "landsat8")
    assert [g for _, g, _, _ in mapped] == ["B2", "B3", "B4", "B5"]  # by wavelength, any order


def test_a_second_cross_sensor_folder_of_one_sensor_keeps_the_first_results(tmp_path):
    """Issue 26.6: results of another sensor's folder go to ``cross_sensor/<dataset>_<sensor>``;
    the same folder evaluated again goes there again, another folder of the same sensor to
    ``<dataset>_<sensor>_2`` (then ``_3``), never over the first one's results."""
    from deflect.engine.report import cross_sensor_folder

    run = tmp_path / "run"
    a, b, c = (tmp_path / name for name in ("tiles_a", "tiles_b", "tiles_c"))
    first = cross_sensor_folder(run, "folder", "landsat8", a)
    assert first == run / "cross_sensor" / "folder_landsat8"
    first.mkdir(parents=True)
    (first / "test_metrics.json").write_text(json.dumps({"root": str(a.resolve())}))
    assert cross_sensor_folder(run, "folder", "landsat8", a) == first  # re-evaluated in place
    second = cross_sensor_folder(run, "folder", "landsat8", b)
    assert second == run / "cross_sensor" / "folder_landsat8_2"
    second.mkdir()
    (second / "test_metrics.json").write_text(json.dumps({"root": str(b.resolve())}))
    assert cross_sensor_folder(run, "folder", "landsat8", b) == second
    assert cross_sensor_folder(run, "folder", "landsat8", c).name == "folder_landsat8_3"
    assert cross_sensor_folder(run, "chips", "landsat8", b).name == "chips_landsat8"


def test_a_landsat8_scene_is_mapped_to_the_trained_bands_and_converted(predictor, tmp_path):
    """predict.py --sensor landsat8 [--reflectance-scale 1]: the same map as the Sentinel-2
    scene (reflectance is physical; only names and units differ)."""
    image = demo_pixels(40, 40)
    s2 = write_scene(tmp_path / "s2.tif", image)
    l8 = write_scene(tmp_path / "l8.tif", image[[3, 2, 1, 0]], ["B5", "B4", "B3", "B2"])
    fraction = np.where(np.isfinite(image) & (image != NODATA), image / 10000, image)
    l8f = write_scene(tmp_path / "l8_float.tif", fraction, ["B2", "B3", "B4", "B5"])
    expected = read(predict.predict_scene(predictor, s2, tmp_path / "a", progress=False).prediction)
    got = predict.predict_scene(predictor, l8, tmp_path / "b", progress=False, sensor="landsat8")
    np.testing.assert_array_equal(read(got.prediction), expected)
    got = predict.predict_scene(predictor, l8f, tmp_path / "c", progress=False, sensor="landsat8",
                                reflectance_scale=1.0)  # fmt: skip
    assert (read(got.prediction) == expected).mean() > 0.999  # float32 rounding of x/1e4*1e4
    with pytest.raises(ValueError, match="no counterpart for B8"):
        predict.predict_scene(predictor, l8, tmp_path / "d", progress=False, sensor="landsat8",
                              bands=["B6", "B4", "B3", "B2"])  # fmt: skip


def test_a_class_map_gets_its_palette_without_a_gdal_error(tmp_path, caplog):
    """The colour table goes in before the pixels: written after them, GDAL logs 'Cannot modify
    tag "PhotometricInterpretation" while writing' for every evaluation GeoTIFF."""
    import logging

    from rasterio.enums import ColorInterp

    from deflect.geotiff import class_colours, write_prediction_geotiff

    pred = np.array([[0, 1], [2, 255]], dtype=np.uint8).repeat(32, 0).repeat(32, 1)
    with caplog.at_level(logging.DEBUG, logger="rasterio._env"):
        write_prediction_geotiff(pred, tmp_path / "p.tif", None, None, ["a", "b", "c"])
    assert not [r for r in caplog.records if "Cannot modify tag" in r.getMessage()]
    with rasterio.open(tmp_path / "p.tif") as src:
        assert src.colorinterp[0] == ColorInterp.palette
        assert src.colormap(1)[2] == class_colours(3)[2]
        assert (src.read(1) == pred).all()
