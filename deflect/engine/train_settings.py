"""How a run trains (:class:`TrainSettings`, from the config's top-level keys) and how every
epoch is seeded, so that a resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from deflect.engine.evaluator import AUTOCAST_DTYPES

MAX_BAD_STEPS = 5  # consecutive non-finite gradient steps before giving up
# Under fp16 the GradScaler skips overflowing steps and halves its scale each time; 30 halvings
# take the default 65536 far below 1, so more skips in a row mean NaNs, not overflow.
MAX_BAD_STEPS_FP16 = 30


def seed_epoch(seed: int, epoch: int, rank: int, generator: torch.Generator | None) -> None:
    """Seed Python, NumPy, torch and the loader's generator from (seed, epoch, rank)."""
    value = (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**31)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    if generator is not None:
        generator.manual_seed(value)


@dataclass(frozen=True)
class TrainSettings:
    """How to train.

    Args:
        epochs: number of epochs.
        precision: fp32, fp16 or bf16 (autocast; a GradScaler for fp16 only).
        grad_clip: max gradient norm (0 disables clipping).
        seed: base seed; every epoch re-seeds from (seed, epoch, rank).
        monitor: validation metric selecting ``best.pt`` and counting the patience (one of the
            task's monitors).
        higher_is_better: whether a higher ``monitor`` is better (the task says; an error
            metric is lower-is-better).
        log_interval: steps between TensorBoard loss/lr points.
        max_steps_per_epoch: cut epochs short (smoke tests); ``None`` for full epochs.
        stop_after_epochs: leave ``fit`` after this many epochs in total, as a job killed by a
            time limit would, keeping ``last.pt`` for ``resume=true``; ``None`` runs them all.
        early_stopping_patience: finish the run (test, export) once the monitored metric has
            not improved by more than ``early_stopping_min_delta`` for this many validations in
            a row (epochs when ``val_every`` is 1); ``None`` or 0: never.
        early_stopping_min_delta: the improvement (in the metric's units, e.g. a fraction for
            an IoU) that resets the patience; ``best.pt`` still follows every improvement.
        val_every: validate every this many epochs and after the last one (an unvalidated
            epoch saves no ``best.pt`` and leaves the patience as it is).
    """

    epochs: int
    precision: str = "fp32"
    grad_clip: float = 1.0
    seed: int = 0
    monitor: str = ""
    higher_is_better: bool = True
    log_interval: int = 10
    max_steps_per_epoch: int | None = None
    stop_after_epochs: int | None = None
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    val_every: int = 1

    def __post_init__(self) -> None:
        if self.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision={self.precision!r} is not one of {list(AUTOCAST_DTYPES)}")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if not self.monitor:
            raise ValueError("monitor is empty: name one of the task's monitors (its headline)")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 0:
            raise ValueError(
                f"early_stopping_patience={self.early_stopping_patience} must be >= 0 (0 or "
                "null: off)"
            )
        if not self.early_stopping_min_delta >= 0:
            raise ValueError(
                f"early_stopping_min_delta={self.early_stopping_min_delta} must be >= 0"
            )
        if (
            isinstance(self.val_every, bool)
            or not isinstance(self.val_every, int)
            or (self.val_every < 1)
        ):
            raise ValueError(
                f"val_every={self.val_every!r}: expected an integer >= 1; e.g. val_every=3 "
                "(validate every 3rd epoch and after the last)"
            )
