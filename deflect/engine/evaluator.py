"""Evaluation with torchmetrics: per-class IoU, F1, precision and recall; means and accuracy.

Metrics come from one confusion matrix accumulated by torchmetrics (rows = ground truth,
columns = prediction), which ignores ``ignore_index`` pixels and is summed across ranks. Each
sample is evaluated exactly once (see :class:`~deflect.engine.distributed.ShardSampler`).

Means (mIoU, mF1, mPrecision, mRecall) are over the classes present in the ground truth of the
evaluated split; a class absent from it has no defined recall or IoU, is reported as ``null``
per class, and is left out of the means (its count is in ``absent_classes``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix
from tqdm import tqdm

from deflect.data import DataSpec
from deflect.engine.distributed import DistInfo, heartbeat
from deflect.engine.inference import sliding_window_logits

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


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate: the encoder input size (larger images go through a sliding window), the
    window stride (default half the window) and the autocast precision of training."""

    window: int
    stride: int | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision={self.precision!r} is not one of {list(AUTOCAST_DTYPES)}")
        if self.window < 1 or (self.stride is not None and self.stride < 1):
            raise ValueError(f"window {self.window} and stride {self.stride} must be >= 1")


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
            "Precision": float(precision[i]) if predicted[i] > 0 else None,
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
    """Evaluates a segmentor on a data loader, exactly, on one process or many.

    Args:
        settings: window, stride and precision.
        data: the data description (class names, ignore index).
        info: this process's rank, world size and device.
    """

    def __init__(self, settings: EvalSettings, data: DataSpec, info: DistInfo) -> None:
        if not data.classes:
            raise ValueError("the data description has no classes to evaluate")
        self.num_classes = data.num_classes
        self.class_names = list(data.classes)
        self.ignore_index = data.ignore_index
        self.window = settings.window
        self.stride = settings.stride or max(settings.window // 2, 1)
        self.precision = settings.precision
        self.info = info

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        desc: str = "eval",
        on_batch: Callable[[dict, torch.Tensor], None] | None = None,
    ) -> dict:
        """Metrics over the whole loader (all ranks); ``on_batch(batch, prediction)`` sees each batch."""
        was_training = model.training
        model.eval()
        confusion = MulticlassConfusionMatrix(
            self.num_classes, ignore_index=self.ignore_index, sync_on_compute=True
        ).to(self.info.device)
        bar = tqdm(
            loader, desc=desc, disable=not self.info.is_main, leave=False, dynamic_ncols=True
        )
        for step, batch in enumerate(bar):
            heartbeat(f"{desc}, batch {step + 1}", self.info)
            images = batch["image"].to(self.info.device, non_blocking=True)
            target = batch["mask"].to(self.info.device, non_blocking=True)
            metadata = batch_metadata(model, batch, self.info.device)
            with autocast_context(self.info.device, self.precision):
                logits = sliding_window_logits(
                    model, images, self.window, self.stride, self.num_classes, **metadata
                )
            prediction = logits.argmax(dim=1)
            confusion.update(prediction, target)
            if on_batch is not None:
                on_batch(batch, prediction)
        matrix = confusion.compute().cpu()
        model.train(was_training)
        result = metrics_from_confusion(matrix, self.class_names)
        result["confusion_matrix"] = matrix.tolist()
        return result
