"""Evaluation with torchmetrics: per-class IoU, F1, precision and recall; means and accuracy.

Metrics come from one confusion matrix accumulated by torchmetrics (rows = ground truth,
columns = prediction), which ignores ``ignore_index`` pixels and is summed across ranks. Each
sample is evaluated exactly once (see :class:`~deflect.engine.distributed.ShardSampler`).

Means (mIoU, mF1, mPrecision, mRecall) are over the classes present in the ground truth of the
evaluated split, one convention for all four: a class absent from it has no IoU, F1, precision or
recall, is reported as ``null`` per class, and is left out of every mean (its count is in
``absent_classes``); a present class that is never predicted has precision 0 (no correct
prediction of it), reported and averaged as such.
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
from deflect.tasks.segmentation import SegmentationTask

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


#: Kept for callers of the segmentation-only API: the settings of a task's inference.
EvalSettings = InferenceSettings


def metrics_from_confusion(confusion: torch.Tensor, class_names: list[str]) -> dict:
    """Per-class and mean metrics from a confusion matrix ``[target, prediction]``."""
    cm = confusion.double()
    tp = cm.diag()
    support = cm.sum(dim=1)  # ground-truth pixels per class
    predicted = cm.sum(dim=0)  # predicted pixels per class
    present = support > 0

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    iou = ratio(tp, support + predicted - tp)
    precision = ratio(tp, predicted)
    recall = ratio(tp, support)
    f1 = ratio(2 * tp, support + predicted)
    per_class = {}
    for i, name in enumerate(class_names):
        ok = bool(present[i])
        per_class[name] = {
            "IoU": float(iou[i]) if ok else None,
            "F1": float(f1[i]) if ok else None,
            "Precision": float(precision[i]) if ok else None,
            "Recall": float(recall[i]) if ok else None,
            "support": int(support[i]),
        }

    def mean(values: torch.Tensor) -> float:
        return float(values[present].mean()) if present.any() else float("nan")

    total = cm.sum()
    return {
        "mIoU": mean(iou),
        "mF1": mean(f1),
        "mPrecision": mean(precision),
        "mRecall": mean(recall),
        "OA": float(tp.sum() / total) if total > 0 else float("nan"),
        "absent_classes": int((~present).sum()),
        "pixels": int(total),
        "per_class": per_class,
    }


class Evaluator:
    """Evaluates a model on a data loader, exactly, on one process or many: the task decides
    how each batch is inferred and what is measured.

    Args:
        task: what is predicted (:class:`~deflect.tasks.Task`); segmentation when omitted.
        settings: window, stride and precision.
        data: the data description (class names, ignore index).
        info: this process's rank, world size and device.
    """

    def __init__(self, task: Task | InferenceSettings, settings: InferenceSettings | DataSpec,
                 data: DataSpec | DistInfo, info: DistInfo | None = None) -> None:  # fmt: skip
        if info is None:  # Evaluator(settings, data, info): the segmentation-only signature
            task, settings, data, info = SegmentationTask(), task, settings, data
        if not data.classes:
            raise ValueError("the data description has no classes to evaluate")
        self.task = task
        self.data = data
        self.num_classes = data.num_classes
        self.class_names = list(data.classes)
        self.ignore_index = data.ignore_index
        self.settings = settings
        self.window = settings.window
        self.stride = settings.step
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
                output = self.task.infer(model, images, metadata, self.settings, self.num_classes)
            metric.update(output, target)
            if on_batch is not None:
                on_batch(batch, self.task.predict(output), output)
        model.train(was_training)
        return metric.compute()
