"""Early stopping: the run ends once the monitored validation metric has not improved by more
than ``early_stopping_min_delta`` for ``early_stopping_patience`` epochs, says so, records the
epoch in ``metrics.json``, and a run stopped and resumed on the way stops at the same epoch.

The real Trainer is run on a one-parameter model whose validation metric is scripted per epoch,
so the epoch it must stop at is known by hand."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from deflect.engine.distributed import DistInfo
from deflect.engine.logging import ScalarWriter
from deflect.engine.trainer import Trainer, TrainSettings
from deflect.engine.workdir import check_run_config

#: The validation mIoU of epochs 1, 2, ...: it improves by more than 0.02 until epoch 3
#: (0.35), then by 0.01 at epoch 5 (0.36, a new best.pt), then never again.
SCRIPT = [0.10, 0.30, 0.35, 0.34, 0.36, 0.20, 0.10, 0.30, 0.33, 0.35]


class Scalar(nn.Module):
    """One trainable weight; ``auxiliary_losses`` as the framework's models have."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    def auxiliary_losses(self) -> dict:
        return {}


class ScriptedEvaluator:
    """Validation whose metric is ``SCRIPT[epoch - 1]``, read from the epoch in ``desc``."""

    ignore_index, data = -1, None

    def evaluate(self, model, loader, desc: str = "") -> dict:
        epoch = int(desc.split()[1].split("/")[0])
        return {"mIoU": SCRIPT[epoch - 1]}


class ErrorEvaluator(ScriptedEvaluator):
    """The same script negated, as an error metric whose lower values are better: a trainer
    that follows the metric's direction selects and stops exactly where it does on the
    script (negation is exact in floating point, so no comparison lands elsewhere)."""

    def evaluate(self, model, loader, desc: str = "") -> dict:
        return {"error": -super().evaluate(model, loader, desc)["mIoU"]}


class Task:
    """What the trainer asks of a task, for a regression on ``target``."""

    def has_signal(self, batch, data) -> bool:
        return True

    def target(self, batch) -> torch.Tensor:
        return batch["target"]

    def scalars(self, split: str, metrics: dict) -> dict:
        return {f"{split}/{name}": value for name, value in metrics.items()}

    def log_line(self, metrics: dict) -> str:
        return str(metrics)


def trainer(work_dir: Path, patience: int | None, min_delta: float, evaluator=None,
            **settings) -> Trainer:  # fmt: skip
    torch.manual_seed(0)
    model = Scalar()
    batches = [{"image": torch.ones(2, 1), "target": torch.full((2, 1), 0.5)}] * 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(
        model=model, raw_model=model, task=Task(),
        settings=TrainSettings(epochs=len(SCRIPT), early_stopping_patience=patience,
                               early_stopping_min_delta=min_delta,
                               **{"monitor": "mIoU", **settings}),
        loss_fn=nn.MSELoss(), optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        train_loader=batches, loader_generator=None, evaluator=evaluator or ScriptedEvaluator(),
        val_loader=[], work_dir=work_dir, info=DistInfo(0, 1, 0, torch.device("cpu")),
        writer=ScalarWriter(None),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("patience", "min_delta", "stops_at", "best"),
    [
        (2, 0.02, 5, 5),  # epochs 4 and 5 gain less than 0.02 over 0.35
        (2, 0.0, 7, 5),  # epoch 5 improves: 6 and 7 do not
        (3, 0.0, 8, 5),  # 6, 7, 8 below 0.36
        (None, 0.0, None, 5),  # off: all ten epochs
        (0, 0.0, None, 5),  # 0 is off too
    ],
)
def test_training_stops_at_the_epoch_the_patience_runs_out(
    patience, min_delta, stops_at, best, tmp_path, caplog
):
    run = trainer(tmp_path, patience, min_delta)
    with caplog.at_level(logging.INFO):
        assert run.fit() is True  # finished: the run goes on to test its best checkpoint
    assert run.stopped_early_at == stops_at and run.best_epoch + 1 == best
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] + 1 == (stops_at or len(SCRIPT))  # no epoch trained after the stop
    record = run.early_stopping_record()["early_stopping"]
    assert record["stopped_at_epoch"] == stops_at and record["patience"] == (patience or None)
    said = [r.getMessage() for r in caplog.records if "early stopping" in r.getMessage()]
    if stops_at:
        assert said == [
            f"early stopping after epoch {stops_at} of 10: val mIoU has not improved by more "
            f"than {min_delta:g} for {patience} validations (best 0.3600 at epoch 5); testing the "
            "best checkpoint"
        ]
    else:
        assert not said


@pytest.mark.parametrize(
    ("patience", "min_delta", "stops_at", "best"),
    [(2, 0.02, 5, 5), (2, 0.0, 7, 5), (3, 0.0, 8, 5), (None, 0.0, None, 5)],
)
def test_a_lower_is_better_metric_selects_and_stops_as_its_mirror_image(
    patience, min_delta, stops_at, best, tmp_path
):
    """The script negated and monitored lower-is-better: the same best epoch, the same stop;
    best.pt holds the lowest error (a trainer that maximised it would keep epoch 1's)."""
    run = trainer(tmp_path, patience, min_delta, ErrorEvaluator(), monitor="error",
                  higher_is_better=False)  # fmt: skip
    assert run.fit() is True
    assert run.stopped_early_at == stops_at and run.best_epoch + 1 == best
    assert run.best_score == -max(SCRIPT[: stops_at or len(SCRIPT)])
    best_pt = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best_pt["epoch"] + 1 == best


@pytest.mark.parametrize("stop_after", [4, 6])
def test_a_resumed_run_stops_where_an_uninterrupted_one_does(stop_after, tmp_path):
    """Stopped after epoch 4 (one epoch into the patience) or 6 (two into it), then resumed
    from last.pt by a new trainer: it stops after epoch 8, as the uninterrupted run does (a
    patience count lost on resume would stop it at 9 or never)."""
    straight = trainer(tmp_path / "straight", 3, 0.0)
    straight.fit()
    first = trainer(tmp_path / "stopped", 3, 0.0, stop_after_epochs=stop_after)
    assert first.fit() is False and first.stopped_early_at is None
    resumed = trainer(tmp_path / "stopped", 3, 0.0)
    resumed.resume(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert resumed.fit() is True
    assert resumed.stopped_early_at == straight.stopped_early_at == 8
    assert resumed.best_epoch == straight.best_epoch == 4
    assert torch.equal(resumed.raw_model.weight, straight.raw_model.weight)


def test_early_stopping_settings_are_checked_before_anything_is_built():
    from omegaconf import OmegaConf

    good = OmegaConf.create({"early_stopping_patience": 3, "early_stopping_min_delta": 0.001})
    assert check_run_config(good) == []
    for key, bad, message in (
        ("early_stopping_patience", -1, "early_stopping_patience=-1: expected an integer >= 0"),
        ("early_stopping_patience", 2.5, "early_stopping_patience=2.5: expected an integer"),
        ("early_stopping_min_delta", -0.1, "early_stopping_min_delta=-0.1: expected a number"),
    ):
        with pytest.raises(ValueError, match=message):
            check_run_config(OmegaConf.merge(good, {key: bad}))


def test_a_run_saved_before_early_stopping_existed_resumes_without_a_change():
    """Its config.yaml lacks the keys: it trained without early stopping, which is what the
    defaults do, so resume=true with them is no change; turning it on is one."""
    from omegaconf import OmegaConf

    from deflect.engine.workdir import resume_config_changes

    saved = OmegaConf.create({"epochs": 3})
    current = OmegaConf.create({"epochs": 3, "early_stopping_patience": None,
                                "early_stopping_min_delta": 0.0})  # fmt: skip
    assert resume_config_changes(saved, current) == []
    turned_on = OmegaConf.merge(current, {"early_stopping_patience": 3})
    assert resume_config_changes(saved, turned_on) == ["early_stopping_patience: None -> 3"]
