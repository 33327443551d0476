"""Evaluation of a model on a loader, for any task: the run's :class:`~deflect.tasks.Task` infers
each batch and accumulates its metrics (summed across ranks); each sample is evaluated exactly
once (see :class:`~deflect.engine.distributed.ShardSampler`). Also the autocast context that
training and evaluation share.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn
from tqdm import tqdm

from deflect.data import DataSpec
from deflect.engine.distributed import DistInfo, heartbeat
from deflect.tasks.base import InferenceSettings, Task

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_context(device: torch.device, precision: str):
    """Autocast for fp16/bf16 (training and evaluation alike); nothing for fp32."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision={precision!r} is not one of {list(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def batch_metadata(model: nn.Module, batch: dict, device: torch.device) -> dict:
    """The per-sample metadata the model's encoder takes (its ``metadata_keys``) from a batch."""
    keys = getattr(model, "metadata_keys", ())
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}


class Evaluator:
    """Evaluates a model on a data loader, exactly, on one process or many: the task decides
    how each batch is inferred and what is measured.

    Args:
        task: what is predicted (:class:`~deflect.tasks.Task`).
        settings: window, stride and precision.
        data: the data description (what the model predicts, the ignore index, ...).
        info: this process's rank, world size and device.
    """

    def __init__(self, task: Task, settings: InferenceSettings, data: DataSpec,
                 info: DistInfo) -> None:  # fmt: skip
        self.task = task
        self.data = data
        self.settings = settings
        self.precision = settings.precision
        self.info = info

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        desc: str = "eval",
        on_batch: Callable[..., None] | None = None,
    ) -> dict:
        """Metrics over the whole loader (all ranks); ``on_batch(batch, prediction, output)``
        sees each batch."""
        was_training = model.training
        model.eval()
        metric = self.task.metric(self.data, self.info.device)
        bar = tqdm(
            loader, desc=desc, disable=not self.info.is_main, leave=False, dynamic_ncols=True
        )
        for step, batch in enumerate(bar):
            heartbeat(f"{desc}, batch {step + 1}", self.info)
            images = batch["image"].to(self.info.device, non_blocking=True)
            target = self.task.target(batch).to(self.info.device, non_blocking=True)
            metadata = batch_metadata(model, batch, self.info.device)
            with autocast_context(self.info.device, self.precision):
                output = self.task.infer(model, images, metadata, self.settings, self.data)
            metric.update(output, target)
            if on_batch is not None:
                on_batch(batch, self.task.predict(output), output)
        model.train(was_training)
        return metric.compute()
