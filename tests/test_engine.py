"""Engine parts against independent oracles: metrics, sliding window, schedule, checkpoints."""

from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_jaccard_index

from deflect.data import DataSpec
from deflect.engine.checkpoint import atomic_save, load_checkpoint, trainable_state_dict
from deflect.engine.distributed import DistInfo, ShardSampler
from deflect.engine.evaluator import Evaluator
from deflect.engine.scheduler import warmup_decay
from deflect.tasks import InferenceSettings, SegmentationTask
from deflect.tasks.segmentation import metrics_from_confusion
from deflect.tiling import sliding_window_logits, window_starts

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class LogitsAreInput(torch.nn.Module):
    """A 'model' whose logits are its input: evaluation of a known prediction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_metrics_equal_hand_counted_confusion_matrix_with_ignored_pixels():
    rng = np.random.default_rng(0)
    k, ignore = 4, -1
    target = rng.integers(0, 3, size=(3, 8, 8))  # class 3 never in the ground truth
    target[:, :2, :] = ignore
    prediction = rng.integers(0, 4, size=(3, 8, 8))
    # Hand count over labelled pixels only: rows = truth, columns = prediction.
    cm = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(target.ravel(), prediction.ravel()):
        if t != ignore:
            cm[t, p] += 1
    logits = torch.nn.functional.one_hot(torch.from_numpy(prediction), k).permute(0, 3, 1, 2)
    batch = {"image": logits.float(), "mask": torch.from_numpy(target)}
    data = DataSpec(bands=("B1",), classes=tuple("abcd"), ignore_index=ignore)
    evaluator = Evaluator(SegmentationTask(), InferenceSettings(window=8), data, CPU)
    metrics = evaluator.evaluate(LogitsAreInput(), [batch])
    assert np.array_equal(np.array(metrics["confusion_matrix"]), cm)
    for c, name in enumerate("abc"):
        tp, fn, fp = cm[c, c], cm[c].sum() - cm[c, c], cm[:, c].sum() - cm[c, c]
        per = metrics["per_class"][name]
        assert per["IoU"] == pytest.approx(tp / (tp + fp + fn))
        assert per["Precision"] == pytest.approx(tp / (tp + fp))  # of what was predicted c
        assert per["Recall"] == pytest.approx(tp / (tp + fn))  # of what truly is c
        assert per["F1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # Class d is absent from the truth: no IoU, and not averaged in.
    assert metrics["per_class"]["d"]["IoU"] is None and metrics["absent_classes"] == 1
    ious = [metrics["per_class"][n]["IoU"] for n in "abc"]
    assert metrics["mIoU"] == pytest.approx(np.mean(ious))
    assert metrics["OA"] == pytest.approx(np.trace(cm) / cm.sum())
    assert metrics["pixels"] == int((target != ignore).sum())
    # torchmetrics' own IoU agrees on the classes present.
    tm = multiclass_jaccard_index(
        torch.from_numpy(prediction), torch.from_numpy(target), k, average=None, ignore_index=ignore
    )
    assert np.allclose(tm[:3].numpy(), ious)


def test_metrics_from_confusion_swapping_axes_would_fail():
    cm = torch.tensor([[8, 2], [0, 10]])  # truth 0 predicted 1 twice
    m = metrics_from_confusion(cm, ["x", "y"])
    assert m["per_class"]["x"]["Recall"] == pytest.approx(0.8)
    assert m["per_class"]["x"]["Precision"] == pytest.approx(1.0)
    assert m["per_class"]["y"]["Precision"] == pytest.approx(10 / 12)


def test_sliding_window_equals_direct_forward_for_a_local_model():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 5, kernel_size=1)
    images = torch.randn(2, 3, 40, 37)
    expected = model(images)
    got = sliding_window_logits(model, images, window=16, stride=8, num_classes=5)
    assert torch.allclose(got, expected, atol=1e-5)
    small = torch.randn(1, 3, 10, 12)  # smaller than the window: padded then cropped
    assert torch.allclose(
        sliding_window_logits(model, small.nan_to_num(), window=16, stride=8, num_classes=5),
        model(small),
        atol=1e-5,
    )


class RecordsInput(torch.nn.Module):
    """Logits from the input's first channel; keeps every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, **metadata) -> torch.Tensor:
        self.seen.append((x.clone(), metadata))
        return x[:, :2].nan_to_num()


def test_sliding_window_pads_with_nan_like_training_crops_and_passes_metadata():
    """Padding marks pixels invalid (NaN), as JointTransform pads training crops."""
    model = RecordsInput()
    images = torch.randn(2, 3, 10, 12)
    gsd = torch.tensor([10.0, 30.0])
    sliding_window_logits(model, images, window=16, stride=8, num_classes=2, gsd=gsd)
    ((tile, metadata),) = model.seen
    assert tile.shape == (2, 3, 16, 16) and torch.equal(tile[..., :10, :12], images)
    assert tile[..., 10:, :].isnan().all() and tile[..., :, 12:].isnan().all()
    assert metadata == {"gsd": gsd}


def test_window_starts_cover_every_pixel():
    for length, window, stride in [(40, 16, 8), (64, 32, 16), (33, 32, 16), (16, 16, 8)]:
        starts = window_starts(length, window, stride)
        covered = np.zeros(length, bool)
        for s in starts:
            assert 0 <= s and s + window <= max(length, window)
            covered[s : s + window] = True
        assert covered.all()


def test_shard_sampler_evaluates_each_sample_exactly_once():
    for n, world in [(10, 3), (7, 2), (2, 4)]:
        seen = sorted(i for r in range(world) for i in ShardSampler(n, r, world))
        assert seen == list(range(n))


def closed_form(step, total, warmup, decay, min_ratio, power=1.0):
    """The schedule written out: linear warmup from 1/(w+1), then cosine or polynomial decay."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / (total - warmup)
    shape = (
        0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else (1 - progress) ** power
    )
    return min_ratio + (1 - min_ratio) * shape


@pytest.mark.parametrize(
    ("decay", "power", "min_ratio"), [("cosine", 1.0, 0.1), ("poly", 1.0, 0.0), ("poly", 2.0, 0.05),
                                      ("poly", 0.9, 0.0)],
)  # fmt: skip
def test_schedules_equal_their_closed_forms(decay, power, min_ratio):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    sched = warmup_decay(opt, total_steps=60, warmup_steps=6, decay=decay, min_lr_ratio=min_ratio,
                         power=power)  # fmt: skip
    for step in range(60):
        expected = 0.5 * closed_form(step, 60, 6, decay, min_ratio, power)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12), step
        opt.step()
        sched.step()


def test_warmup_then_cosine_reaches_min_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = warmup_decay(opt, total_steps=100, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 11)  # warmup starts near zero
    assert lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0)  # peak after warmup
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))
    assert lrs[55] == pytest.approx(mid)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # ends at min_lr_ratio x lr


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_trainable_state_is_a_copy_not_a_reference():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model[0].weight.requires_grad_(False)
    state = trainable_state_dict(model)
    assert "0.weight" not in state and "0.bias" in state and "1.running_mean" in state
    before = state["0.bias"].clone()
    with torch.no_grad():
        model[0].bias.add_(1.0)  # training moves the live weights...
    assert torch.equal(state["0.bias"], before)  # ...but the saved "best" does not move


def test_checkpoint_loading_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"fn": print}, path)  # a pickled callable, not weights
    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_written_files_get_umask_permissions_not_private_ones(tmp_path):
    from deflect.engine.checkpoint import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_save({"a": 1}, tmp_path / "x.pt")
        atomic_write_text("hi", tmp_path / "x.json")
    finally:
        os.umask(old)
    for name in ("x.pt", "x.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_optimizer_groups_scale_the_encoder_lr_and_skip_decay_on_vectors(tmp_path):
    from hydra import compose, initialize_config_dir

    from deflect.engine import build
    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["encoder=tiny_vit", "img_size=32", "finetune=full",
                                           "encoder_lr_scale=0.1", "optimizer.lr=0.01",
                                           f"dataset.root={tmp_path / 'demo'}"])  # fmt: skip
    model = build.build_model(cfg, build.build_dataset(cfg, "train").spec)
    optimizer = build.build_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert lr_of[id(param)] == pytest.approx(0.001 if name.startswith("encoder.") else 0.01)
        assert wd_of[id(param)] == (0.05 if param.ndim >= 2 else 0.0), name
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every parameter in one group


def test_a_run_saved_with_its_task_as_a_class_resumes_under_its_name_without_a_change():
    """Configs saved before tasks had names hold ``task._target_``; the same task by name is no
    change, another task is one."""
    from omegaconf import OmegaConf

    from deflect.engine.workdir import resume_config_changes

    saved = OmegaConf.create({"task": {"_target_": "deflect.tasks.ClassificationTask",
                                       "multi_label": False}})  # fmt: skip
    same = OmegaConf.create({"task": {"name": "classification", "multi_label": False}})
    assert resume_config_changes(saved, same) == []
    other = OmegaConf.create({"task": {"name": "segmentation", "multi_label": False}})
    assert resume_config_changes(saved, other) == ["task.name: 'classification' -> 'segmentation'"]


def test_resume_config_changes_lists_what_differs_but_not_free_keys():
    from omegaconf import OmegaConf

    from deflect.engine.workdir import resume_config_changes

    saved = OmegaConf.create({"optimizer": {"lr": 1e-4}, "epochs": 10, "resume": False,
                              "num_workers": 2, "loss": {"dice_weight": 0.0}})  # fmt: skip
    current = OmegaConf.create({"optimizer": {"lr": 1e-3}, "epochs": 10, "resume": True,
                                "num_workers": 0, "loss": {"dice_weight": 0.0}, "new": 1})  # fmt: skip
    assert resume_config_changes(saved, current) == [
        "new: '<absent>' -> 1",
        "optimizer.lr: 0.0001 -> 0.001",
    ]


def test_batches_carry_the_gsd_to_encoders_that_take_it(demo_root):
    """The demo's samples carry its 10 m GSD; only an encoder declaring `gsd` receives it."""
    from datasets import DemoVegetation
    from deflect.engine.evaluator import batch_metadata

    dataset = DemoVegetation(root=str(demo_root), split="val")
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    assert torch.equal(batch["gsd"], torch.tensor([10.0, 10.0]))

    class TakesGsd(torch.nn.Module):
        metadata_keys = ("gsd",)

    assert batch_metadata(TakesGsd(), batch, torch.device("cpu")) == {"gsd": batch["gsd"]}
    assert batch_metadata(torch.nn.Identity(), batch, torch.device("cpu")) == {}


def test_segmentation_refuses_a_batch_its_decoder_cannot_train_on():
    """One image per step would fail deep in UperNet's BatchNorm: the task says so first."""
    with pytest.raises(ValueError, match=r"batch_size=1: .*BatchNorm.*batch_size>=2"):
        SegmentationTask().check_batch_size(1)
    SegmentationTask().check_batch_size(2)


def test_training_loader_refuses_a_batch_larger_than_the_split():
    """More images per batch than the split holds never steps."""
    from omegaconf import OmegaConf

    from deflect.engine.build import build_loader

    cfg = OmegaConf.create({"batch_size": 9, "num_workers": 0, "seed": 0})
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="fewer than"):
        build_loader(list(range(8)), cfg, info, train=True)
    cfg.batch_size = 2
    assert len(build_loader(list(range(8)), cfg, info, train=True)) == 4


def test_the_encoder_lr_scale_defaults_to_the_methods_own_and_the_top_level_key_wins(tmp_path):
    """``encoder_lr_scale`` follows the method's YAML (``finetune.encoder_lr_scale``) unless set
    at the top level; a scale that is no positive number is refused naming the key."""
    import yaml
    from hydra import compose, initialize_config_dir

    from deflect.engine import build
    from tests.conftest import REPO

    def encoder_lrs(*overrides):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose("config", overrides=["encoder=tiny_vit", "img_size=32",
                                               "optimizer.lr=0.01", *overrides,
                                               f"dataset.root={tmp_path / 'demo'}"])  # fmt: skip
        model = build.build_model(cfg, build.build_dataset(cfg, "train").spec)
        optimizer = build.build_optimizer(cfg, model)
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        lrs = {round(lr_of[id(p)], 12) for n, p in model.named_parameters()
               if p.requires_grad and n.startswith("encoder.")}  # fmt: skip
        (lr,) = lrs  # one encoder learning rate
        return lr

    own = yaml.safe_load((REPO / "configs" / "finetune" / "deflect.yaml").read_text())
    assert encoder_lrs("finetune=deflect") == pytest.approx(0.01 * own["encoder_lr_scale"])
    assert encoder_lrs("finetune=deflect", "finetune.encoder_lr_scale=7") == pytest.approx(0.07)
    assert encoder_lrs("finetune=deflect", "finetune.encoder_lr_scale=7",
                       "encoder_lr_scale=2") == pytest.approx(0.02)  # fmt: skip
    from deflect.tuners import DeflectConfig

    with pytest.raises(ValueError, match="encoder_lr_scale must be a number above 0"):
        DeflectConfig(encoder_lr_scale=0)
