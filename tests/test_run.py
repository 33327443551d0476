"""run.py end to end, as a user runs it: training, the run folder, evaluation from it, resume,
and the bad inputs that must fail with one clear message."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

from deflect.pictures import PALETTE
from tests.conftest import REPO, TINY, run_cli


def only_run(cwd: Path) -> Path:
    runs = sorted((cwd / "work_dirs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("run")
    proc = run_cli([*TINY, f"dataset.root={demo_root}", "finetune=frozen", "num_vis=3"], cwd)
    return only_run(cwd), proc.stdout + proc.stderr


def test_run_folder_holds_config_logs_metrics_checkpoints(trained):
    work_dir, output = trained
    assert work_dir.name.endswith("_tiny_vit_frozen_demo")
    for name in (
        "config.yaml",
        "train.log",
        "metrics.json",
        "params.json",
        "test_metrics.json",
        "checkpoints/best.pt",
        "test_predictions.png",
        "confusion_matrix.png",
    ):
        assert (work_dir / name).is_file(), name
    # A finished run is never resumed, so its optimiser state is deleted (keep_last=false).
    assert not (work_dir / "checkpoints" / "last.pt").exists()
    assert "deleted" in output and "keep_last=true keeps it" in output
    summary = json.loads((work_dir / "metrics.json").read_text())
    assert set(summary) >= {"best_val", "test", "params"}
    # What the run cost: 2 epochs x 3 steps x 4 images; a torch process holds > 100 MiB.
    assert summary["train_images"] == 2 * 3 * 4
    assert 0 < summary["train_images_per_s"] < 1e5
    assert summary["peak_memory_kind"] == "host_rss" and 100 < summary["peak_memory_mb"] < 24e3
    assert json.loads((work_dir / "job.json").read_text())["num"] == 0
    assert not (work_dir / "failed.txt").exists()
    assert 1 <= summary["best_val"]["epoch"] <= 2
    assert set(summary["test"]["per_class"]) == {"bare", "sparse", "moderate", "dense"}
    # What the user sees: the parameter count at start and the per-class table at the end.
    assert "parameters: encoder 0 trainable" in output
    assert "moderate" in output and "overall accuracy" in output


def test_parameter_counts_match_the_model(trained, demo_root):
    work_dir, _ = trained
    counts = json.loads((work_dir / "params.json").read_text())
    from omegaconf import OmegaConf

    from deflect.engine import build

    cfg = OmegaConf.load(work_dir / "config.yaml")
    model = build.build_model(cfg, build.build_dataset(cfg, "train").spec)
    decoder = [*model.neck.parameters(), *model.decode_head.parameters()]
    assert counts["encoder_trainable"] == 0  # frozen
    assert counts["decoder_trainable"] == sum(p.numel() for p in decoder)
    assert counts["encoder_total"] == sum(p.numel() for p in model.encoder.parameters())


def test_tensorboard_has_loss_lr_and_metric_curves(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work_dir, _ = trained
    events = EventAccumulator(str(work_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/mIoU", "val_IoU/dense", "test/mIoU"} <= tags
    assert [e.step for e in events.Scalars("val/mIoU")] == [1, 2]
    best = json.loads((work_dir / "metrics.json").read_text())["best_val"]
    logged = {e.step: e.value for e in events.Scalars("val/mIoU")}
    assert logged[best["epoch"]] == pytest.approx(best["mIoU"], rel=1e-6)


def test_geotiff_predictions_keep_georeferencing_and_match_metrics(trained, demo_root):
    work_dir, _ = trained
    metrics = json.loads((work_dir / "test_metrics.json").read_text())
    predictions = sorted((work_dir / "predictions").glob("*.tif"))
    masks = sorted((demo_root / "test").glob("*_mask.tif"))
    assert len(predictions) == len(masks) == 5
    cm = np.zeros((4, 4), dtype=np.int64)
    for pred_path, mask_path in zip(predictions, masks):
        assert pred_path.name == mask_path.name.replace("_mask", "")
        with rasterio.open(pred_path) as pred, rasterio.open(mask_path) as mask:
            assert pred.crs == mask.crs and pred.transform == mask.transform
            # Each value explained: its class's colour in the pictures, its name in a band tag.
            colours = pred.colormap(1)
            assert [colours[k][:3] for k in range(4)] == [tuple(c) for c in PALETTE[:4].tolist()]
            assert colours[255] == (0, 0, 0, 0) and pred.tags(1)["3"] == "dense"
            p, t = pred.read(1).astype(int), mask.read(1).astype(int)
        labelled = t < 4  # the demo stores pixels scored by another tile as 255
        np.add.at(cm, (t[labelled], p[labelled]), 1)
    # The confusion matrix recounted from the GeoTIFFs is the one the metrics came from.
    assert cm.tolist() == metrics["confusion_matrix"]


def test_prediction_png_shows_rgb_truth_prediction_rows(trained):
    work_dir, _ = trained
    image = np.asarray(Image.open(work_dir / "test_predictions.png").convert("RGB"))
    tile = 64 * 4  # demo tiles, drawn 4x
    assert image.shape[1] == 3 * tile + 4 * 4
    assert image.shape[0] >= 16 + 3 * (tile + 4)
    rgb_panel = image[16 : 16 + tile, 4 : 4 + tile]
    assert rgb_panel.std() > 10  # a real picture, not a blank panel


def test_eval_dir_reproduces_the_training_runs_test_metrics(trained, tmp_path):
    work_dir, _ = trained
    run_cli([f"eval_dir={work_dir}", "eval_batch_size=2", "num_vis=1"], tmp_path)
    reported = json.loads((work_dir / "metrics.json").read_text())["test"]
    again = json.loads((work_dir / "test_metrics.json").read_text())
    assert again["confusion_matrix"] == reported["confusion_matrix"]
    assert again["mIoU"] == reported["mIoU"]


def test_resume_after_a_stop_ends_where_an_uninterrupted_run_ends(demo_root, tmp_path):
    """Also: resuming with another setting is refused (config.yaml unchanged), and the
    temporary a SIGKILL during a checkpoint write leaves is removed on resume."""
    args = [*TINY, f"dataset.root={demo_root}", "finetune=full", "save_predictions=false",
            "keep_last=true"]  # fmt: skip
    run_cli([*args, f"work_dir={tmp_path / 'straight'}"], tmp_path)
    stopped = tmp_path / "stopped"
    run_cli([*args, f"work_dir={stopped}", "stop_after_epochs=1"], tmp_path)
    first = torch.load(stopped / "checkpoints/last.pt", weights_only=True)
    assert first["epoch"] == 0 and not (stopped / "metrics.json").exists()
    saved = (stopped / "config.yaml").read_text()
    changed = run_cli([*args, f"work_dir={stopped}", "resume=true", "epochs=3"], tmp_path,
                      check=False)  # fmt: skip
    assert changed.returncode != 0 and "epochs: 2 -> 3" in changed.stderr
    assert "resume_allow_changes=true" in changed.stderr
    assert (stopped / "config.yaml").read_text() == saved  # not rewritten to unseen values
    stale = stopped / "checkpoints" / ".last.pt.k3x_9q2a.tmp.pt"  # as atomic_path names them
    stale.write_bytes(b"\0" * 4096)
    resumed = run_cli([*args, f"work_dir={stopped}", "resume=true"], tmp_path)
    assert "differ from its saved config" not in resumed.stdout + resumed.stderr
    assert not stale.exists() and "left by a write that was interrupted" in resumed.stdout
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    b = torch.load(stopped / "checkpoints/last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    ma = json.loads((tmp_path / "straight/metrics.json").read_text())
    mb = json.loads((stopped / "metrics.json").read_text())
    assert ma["test"]["confusion_matrix"] == mb["test"]["confusion_matrix"]
    # The resumed run reports the whole run's cost, its first epoch included: 2 x 3 x 4 images.
    assert ma["train_images"] == mb["train_images"] == 2 * 3 * 4
    assert mb["train_images_per_s"] > 0 and mb["peak_memory_mb"] > 100


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(["dataset.bands=[B2,B3,B4,B99]"], "B99", marks=pytest.mark.slow),
        (["dataset.bands=[B2,B3,B8]"], "B4"),
        (["bogus_option=1"], "bogus_option"),
        (["encoder.bogus_option=1"], "bogus_option"),
        (["precision=fp8"], "fp8"),
    ],
    ids=["unknown-band", "lacks-rgb-band", "unknown-key", "unknown-nested-key", "bad-precision"],
)
def test_bad_input_fails_with_a_message_naming_it(overrides, message, demo_root, tmp_path):
    proc = run_cli([*TINY, f"dataset.root={demo_root}", *overrides], tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout


def test_a_bad_key_is_reported_before_torch_is_imported(tmp_path):
    """Hydra's own errors come at once: run.py imports torch, timm and torchvision (about ten
    seconds on a small CPU) only after the config has composed; ``import deflect`` neither."""
    code = (
        "import runpy, sys\n"
        "import deflect\n"
        "assert 'torch' not in sys.modules, 'import deflect imported torch'\n"
        f"sys.argv = [{str(REPO / 'run.py')!r}, 'bogus_option=1']\n"
        "try:\n"
        f"    runpy.run_path({str(REPO / 'run.py')!r}, run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    print('exit', stop.code)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert "bogus_option" in proc.stderr, proc.stderr[-3000:]
    assert "exit 1" in proc.stdout and "torch imported: False" in proc.stdout, proc.stdout


def test_the_package_exports_its_api_on_first_use():
    import deflect

    for name in deflect.__all__:
        assert getattr(deflect, name).__name__ == name, name
    assert set(deflect.__all__) <= set(dir(deflect))
    with pytest.raises(AttributeError, match="no_such_name"):
        deflect.no_such_name  # noqa: B018


def test_missing_dataset_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_cli(
        [*TINY, "dataset=folder", f"dataset.root={missing}", "dataset.available_bands=[B2,B3,B4]",
         "dataset.classes=[a,b]"],
        tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "dataset.root" in proc.stderr


def test_eval_dir_without_checkpoint_says_how_to_fix(trained, tmp_path):
    work_dir, _ = trained
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(work_dir / "config.yaml", partial / "config.yaml")
    proc = run_cli([f"eval_dir={partial}"], tmp_path, check=False)
    assert proc.returncode != 0 and "no checkpoints/best.pt" in proc.stderr
    proc = run_cli([f"eval_dir={tmp_path / 'nothing'}"], tmp_path, check=False)
    assert proc.returncode != 0 and "not a run folder" in proc.stderr


def test_corrupt_geotiff_is_named_and_earlier_outputs_survive(demo_root, tmp_path):
    data = tmp_path / "demo"
    shutil.copytree(demo_root, data)
    bad = sorted((data / "test").glob("*_image.tif"))[0]
    bad.write_bytes(b"this is not a GeoTIFF")
    work_dir = tmp_path / "run"
    # (The reflectance check reads a few samples of each split up front and would name the file
    # before training; without it, the file is first read after training.)
    proc = run_cli([*TINY, f"dataset.root={data}", "epochs=1", f"work_dir={work_dir}",
                    "check_reflectance_scale=false"], tmp_path, check=False)  # fmt: skip
    assert proc.returncode != 0 and bad.name in proc.stderr
    # Training finished before the test split was read: its checkpoints are intact.
    state = torch.load(work_dir / "checkpoints/best.pt", weights_only=True)
    assert state["epoch"] == 0
    # A second start in the same folder refuses to overwrite it.
    again = run_cli([*TINY, f"dataset.root={data}", f"work_dir={work_dir}"], tmp_path, check=False)
    assert again.returncode != 0 and "resume=true" in again.stderr
    assert torch.load(work_dir / "checkpoints/best.pt", weights_only=True)["epoch"] == 0


def test_deflect_run_checkpoint_adapter_export_and_aux_loss(demo_root, tmp_path):
    """DEFLECT through run.py: soft deflection's loss is logged; best.pt holds only what trains;
    the exported adapter on a fresh base encoder reproduces the trained encoder's features."""
    from omegaconf import OmegaConf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deflect import DeflectModel
    from deflect.engine import build
    from deflect.engine.checkpoint import load_trainable_state

    work_dir = tmp_path / "deflect"
    args = [*TINY, f"dataset.root={demo_root}", "finetune=deflect", "finetune.deflection=soft",
            "epochs=1", f"work_dir={work_dir}", "log_interval=1"]  # fmt: skip
    proc = run_cli(args, tmp_path)
    assert "% of the GFM" in proc.stdout + proc.stderr
    events = EventAccumulator(str(work_dir / "tensorboard"))
    events.Reload()
    deflection = [e.value for e in events.Scalars("train/deflection")]
    assert len(deflection) == 3 and all(v >= 0 for v in deflection)

    cfg = OmegaConf.load(work_dir / "config.yaml")
    spec = build.build_dataset(cfg, "train").spec
    trained = build.build_model(cfg, spec)
    state = torch.load(work_dir / "checkpoints/best.pt", weights_only=True)["model"]
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in trained.named_buffers()}
    assert set(state) <= trainable | buffers and trainable <= set(state)
    assert all("deflect_" in k for k in state if k.startswith("encoder.") and k in trainable)
    load_trainable_state(trained, state, "best.pt")
    trained.eval()

    files = sorted(p.name for p in (work_dir / "adapter" / "default").iterdir())
    assert files == ["deflect_config.json", "deflect_model.safetensors"]
    torch.manual_seed(int(cfg.seed))  # the same random base weights as the run (no checkpoint)
    base = build.instantiate(cfg.encoder, _partial_=True, _convert_="all")(data=spec)
    restored = DeflectModel.from_pretrained(base, work_dir / "adapter").eval()
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        expected = trained.encoder.forward_features(x)
        got = restored.forward_features(x)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "precision",
    ["bf16", pytest.param("fp16", marks=pytest.mark.slow)],  # one autocast on CPU
)
def test_mixed_precision_trains_and_evaluates_reproducibly(precision, demo_root, tmp_path):
    work_dir = tmp_path / precision
    run_cli([*TINY, f"dataset.root={demo_root}", f"precision={precision}", "epochs=1",
             f"work_dir={work_dir}", "save_predictions=false", "keep_last=true"],
            tmp_path)  # fmt: skip
    last = torch.load(work_dir / "checkpoints/last.pt", weights_only=True)
    assert last["scaler"] == {} if precision == "bf16" else last["scaler"]["scale"] > 0
    reported = json.loads((work_dir / "metrics.json").read_text())["test"]
    assert 0 < reported["mIoU"] <= 1
    if precision == "fp16":
        return  # (bf16 re-evaluates below: the same autocast path, one CLI run fewer)
    run_cli([f"eval_dir={work_dir}"], tmp_path)  # evaluation under the run's own autocast
    again = json.loads((work_dir / "test_metrics.json").read_text())
    assert again["confusion_matrix"] == reported["confusion_matrix"]


def test_non_finite_training_stops_with_a_clear_error(demo_root, tmp_path):
    """Inputs that normalise to inf: every gradient is non-finite; the run stops, never steps."""
    data = tmp_path / "demo"
    shutil.copytree(demo_root, data)
    for path in (data / "train").glob("*_image.tif"):
        with rasterio.open(path, "r+") as dst:
            dst.write(np.full((dst.count, dst.height, dst.width), 65535, dst.dtypes[0]))
    proc = run_cli([*TINY, f"dataset.root={data}", "max_steps_per_epoch=null",
                    "dataset.band_stats.std={B2:1e-45,B3:1e-45,B4:1e-45,B8:1e-45}",
                    "check_reflectance_scale=false"],
                   tmp_path, check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "non-finite loss or gradients" in proc.stderr


def test_batches_without_a_labelled_pixel_train_on_without_nan(demo_root, tmp_path):
    """Training crops with every pixel ignored (sparse labels, as in MADOS): their loss is 0
    and their gradients zero, not the NaN of an empty mean that would stop the run."""
    data = tmp_path / "demo"
    shutil.copytree(demo_root, data)
    for path in (data / "train").glob("*_mask.tif"):
        with rasterio.open(path, "r+") as dst:
            dst.write(np.full((1, dst.height, dst.width), 255, dst.dtypes[0]))  # not evaluated
    work_dir = tmp_path / "run"
    run_cli([*TINY, f"dataset.root={data}", f"work_dir={work_dir}", "save_predictions=false"],
            tmp_path)  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work_dir / "tensorboard")).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses and all(v == 0.0 for v in losses)


def test_multirun_gives_each_job_a_folder_in_one_sweep_folder(demo_root, tmp_path):
    run_cli(["-m", "finetune=frozen,deflect", *TINY, f"dataset.root={demo_root}", "epochs=1",
             "save_predictions=false", "+typo_key=1"], tmp_path)  # fmt: skip
    sweeps = list((tmp_path / "work_dirs" / "multirun").iterdir())
    assert len(sweeps) == 1 and (sweeps[0] / "multirun.yaml").is_file()
    runs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert runs == ["000_tiny_vit_frozen_demo", "001_tiny_vit_deflect_demo"]
    for name, method in zip(runs, ("frozen", "deflect")):
        job = json.loads((sweeps[0] / name / "job.json").read_text())
        assert f"finetune={method}" in job["overrides"] and job["num"] == int(name[:3])
        summary = json.loads((sweeps[0] / name / "metrics.json").read_text())
        assert 0 < summary["test"]["mIoU"] <= 1
        log = (sweeps[0] / name / "train.log").read_text()
        assert "['typo_key'] are read by no part of the framework" in log  # said in each job
    # Resuming the sweep as the README says leaves the finished jobs untouched, byte for byte.
    before = {p: p.read_bytes() for p in sweeps[0].rglob("*") if p.is_file()}
    proc = run_cli(["-m", "finetune=frozen,deflect", *TINY, f"dataset.root={demo_root}",
                    "epochs=1", "save_predictions=false", "+typo_key=1", "resume=true",
                    f"hydra.sweep.dir={sweeps[0]}"], tmp_path)  # fmt: skip
    assert proc.stdout.count("has already finished (it has metrics.json): left untouched") == 2
    after = {p: p.read_bytes() for p in sweeps[0].rglob("*") if p.is_file()}
    # (multirun.yaml is Hydra's record of the launch; .lock names the process that last held
    # the folder, here the resume that looked at it and left.)
    changed = [str(p) for p in after
               if before.get(p) != after[p] and p.name not in ("multirun.yaml", ".lock")]  # fmt: skip
    assert not changed, changed
    assert [p.name for p in (tmp_path / "work_dirs").iterdir()] == ["multirun"]


def test_explain_reproduces_the_test_metric_and_occludes_every_band(trained):
    """scripts/explain.py on a finished run: its baseline is the run's own test mIoU, exactly;
    each band's occlusion is scored; files, train.log table and TensorBoard scalars written."""
    from deflect.engine.explain import explain_run

    work_dir, _ = trained
    report = explain_run(work_dir, "test", "cpu")
    assert (
        report["baseline"]["mIoU"]
        == json.loads((work_dir / "metrics.json").read_text())["test"]["mIoU"]
    )
    assert sorted(r["input"] for r in report["importance"]) == ["B2", "B3", "B4", "B8"]
    rows = {r["input"]: r for r in report["importance"]}
    assert rows["B8"]["drop"] == 0.0  # frozen RGB encoder: NIR never reaches the model
    for name in ("importance.csv", "importance.png", "explain.json"):
        assert (work_dir / "diagnostics" / name).is_file()
    assert "diagnostics (test): drop of mIoU" in (work_dir / "train.log").read_text()


def test_a_wrong_reflectance_scale_stops_training_and_evaluation(trained, demo_root, tmp_path):
    """The demo's L2A files (reflectance x10000) with ``dataset.reflectance_scale=1``: run.py
    stops before training with the scale that fits, leaving no run folder behind; eval_dir with
    the same mistake stops too and leaves the run's results as they were."""
    work_dir, _ = trained
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = run_cli([*TINY, f"dataset.root={demo_root}", "dataset.reflectance_scale=1"], cwd,
                   check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "set dataset.reflectance_scale=10000" in proc.stderr, proc.stderr[-2000:]
    assert "removed the run folder" in proc.stdout + proc.stderr
    assert not list((cwd / "work_dirs").glob("*"))
    before = (work_dir / "test_metrics.json").read_text()
    proc = run_cli([f"eval_dir={work_dir}", "dataset.reflectance_scale=1"], cwd, check=False)
    assert proc.returncode != 0 and "set dataset.reflectance_scale=10000" in proc.stderr
    assert (work_dir / "test_metrics.json").read_text() == before
