"""``val_every``: validation every k-th epoch and after the last; unvalidated epochs save
``last.pt`` but no ``best.pt`` and leave early stopping's patience (counted in validations) as
it is; a run stopped by ``stop_after_epochs`` and resumed ends where an uninterrupted one does.

The real Trainer on test_early_stopping's one-parameter model and scripted validation metric
(``SCRIPT``), so the validated epochs, the best one and the stop are known by hand."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from deflect.engine.distributed import DistInfo
from deflect.engine.trainer import Trainer, TrainSettings
from deflect.engine.workdir import check_run_config
from tests.conftest import TINY, run_cli
from tests.test_early_stopping import Scalar, ScriptedEvaluator, Task


class RecordingWriter:
    """TensorBoard's stand-in: every ``(tag, step)`` written."""

    def __init__(self) -> None:
        self.points: list[tuple[str, int]] = []

    def scalars(self, values: dict, step: int) -> None:
        self.points += [(tag, step) for tag in values]

    def val_steps(self) -> list[int]:
        return [step for tag, step in self.points if tag == "val/mIoU"]


def trainer(work_dir: Path, epochs: int, val_every: int, patience: int | None = None,
            **settings) -> Trainer:  # fmt: skip
    torch.manual_seed(0)
    model = Scalar()
    batches = [{"image": torch.ones(2, 1), "target": torch.full((2, 1), 0.5)}] * 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(
        model=model, raw_model=model, task=Task(),
        settings=TrainSettings(epochs=epochs, monitor="mIoU", val_every=val_every,
                               early_stopping_patience=patience, **settings),
        loss_fn=nn.MSELoss(), optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        train_loader=batches, loader_generator=None, evaluator=ScriptedEvaluator(),
        val_loader=[], work_dir=work_dir, info=DistInfo(0, 1, 0, torch.device("cpu")),
        writer=RecordingWriter(),
    )  # fmt: skip


def test_every_third_epoch_and_the_last_are_validated(tmp_path, caplog):
    """epochs=7, val_every=3: validated 3 (0.35), 6 (0.20), 7 (0.10); best.pt is epoch 3's,
    although unvalidated epoch 5 would have scored 0.36; last.pt follows every epoch."""
    run = trainer(tmp_path, epochs=7, val_every=3)
    with caplog.at_level(logging.INFO):
        assert run.fit() is True
    assert run.writer.val_steps() == [3, 6, 7]
    validated = [int(m[1]) for r in caplog.records
                 if (m := re.match(r"epoch (\d+)/7 .* val ", r.getMessage()))]  # fmt: skip
    assert validated == [3, 6, 7]
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] + 1 == 3 and run.best_score == pytest.approx(0.35)
    record = json.loads((tmp_path / "best_val_metrics.json").read_text())
    assert record["epoch"] == 3 and record["mIoU"] == pytest.approx(0.35)
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 6
    # every epoch trained: the epoch losses are in TensorBoard for all seven
    assert [s for tag, s in run.writer.points if tag == "train/epoch_loss"] == list(range(1, 8))


def test_the_last_epoch_counts_even_off_the_schedule(tmp_path, caplog):
    """epochs=5, val_every=3: validated 3 (0.35) and 5 (0.36), the last, which improves: best.pt
    is epoch 5's, and its log line says (best)."""
    run = trainer(tmp_path, epochs=5, val_every=3)
    with caplog.at_level(logging.INFO):
        assert run.fit() is True
    assert run.writer.val_steps() == [3, 5] and run.best_epoch + 1 == 5
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["epoch"] == 4
    assert [r.getMessage() for r in caplog.records][-1].endswith("(best)")


def test_the_patience_counts_validations_not_epochs(tmp_path):
    """epochs=10, val_every=3, patience 2: validations at 3 (0.35, best), 6 (0.20), 9 (0.33):
    two without improvement, so it stops after epoch 9 (counting epochs, it would have stopped
    after epoch 5 or 6)."""
    run = trainer(tmp_path, epochs=10, val_every=3, patience=2)
    assert run.fit() is True
    assert run.stopped_early_at == 9 and run.best_epoch + 1 == 3
    assert run.writer.val_steps() == [3, 6, 9]
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["epoch"] + 1 == 9


@pytest.mark.parametrize("stop_after", [2, 4, 5])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(stop_after, tmp_path):
    """Left after epoch 2, 4 or 5 (none validated on schedule): that epoch is validated for the
    record (5 scores 0.36, above the scheduled best 0.35) but counts for neither best.pt nor
    the patience, so the resumed run ends as the uninterrupted one: best epoch 3, the same
    weights, the same stop."""
    straight = trainer(tmp_path / "straight", epochs=10, val_every=3, patience=2)
    straight.fit()
    first = trainer(tmp_path / "stopped", epochs=10, val_every=3, patience=2,
                    stop_after_epochs=stop_after)  # fmt: skip
    assert first.fit() is False
    assert first.writer.val_steps() == [s for s in (3,) if s < stop_after] + [stop_after]
    best = tmp_path / "stopped" / "checkpoints" / "best.pt"
    assert best.is_file() == (stop_after > 3)
    resumed = trainer(tmp_path / "stopped", epochs=10, val_every=3, patience=2)
    resumed.resume(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert resumed.fit() is True
    assert resumed.stopped_early_at == straight.stopped_early_at == 9
    assert resumed.best_epoch == straight.best_epoch == 2
    assert torch.equal(resumed.raw_model.weight, straight.raw_model.weight)
    assert torch.load(best, weights_only=True)["epoch"] == 2


def test_a_wrong_val_every_is_an_error_naming_it():
    from omegaconf import OmegaConf

    good = OmegaConf.create({"val_every": 3})
    assert check_run_config(good) == []
    for bad in (0, "two", 1.5, True):
        with pytest.raises(ValueError, match=r"val_every=.*: expected an integer >= 1; e\.g\. "
                                             r"val_every=3"):  # fmt: skip
            check_run_config(OmegaConf.merge(good, {"val_every": bad}))
        with pytest.raises(ValueError, match="val_every=.*: expected an integer >= 1"):
            TrainSettings(epochs=3, monitor="mIoU", val_every=bad)


def test_a_run_saved_before_val_every_existed_resumes_without_a_change():
    from omegaconf import OmegaConf

    from deflect.engine.workdir import resume_config_changes

    saved = OmegaConf.create({"epochs": 3})
    assert resume_config_changes(saved, OmegaConf.create({"epochs": 3, "val_every": 1})) == []
    assert resume_config_changes(saved, OmegaConf.create({"epochs": 3, "val_every": 2})) == [
        "val_every: 1 -> 2"
    ]


@pytest.mark.slow
def test_val_every_through_run_py(demo_root, tmp_path):
    """The tiny run, 7 one-step epochs, val_every=3: the log validates epochs 3, 6 and 7 only,
    and the run's best validation record is one of them; val_every=0 stops before anything
    is built, naming the key."""
    run_dir = tmp_path / "run"
    args = [*TINY, "epochs=7", "max_steps_per_epoch=1", "val_every=3", "save_predictions=false",
            "num_vis=0", f"dataset.root={demo_root}", f"work_dir={run_dir}"]  # fmt: skip
    run_cli(args, tmp_path)
    log = (run_dir / "train.log").read_text()
    assert [int(e) for e in re.findall(r"epoch (\d+)/7 +train loss \S+ +val ", log)] == [3, 6, 7]
    assert re.findall(r"epoch (\d+)/7 +train loss \S+ +\(not validated", log) == list("1245")
    best = json.loads((run_dir / "metrics.json").read_text())["best_val"]["epoch"]
    assert best in (3, 6, 7)
    bad = run_cli([*args[:-1], f"work_dir={tmp_path / 'bad'}", "val_every=0"], tmp_path,
                  check=False)  # fmt: skip
    assert (
        bad.returncode != 0 and "val_every=0: expected an integer >= 1" in bad.stderr + bad.stdout
    )
