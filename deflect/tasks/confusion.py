"""One confusion matrix, the metrics of class predictions (per pixel or per image).

Means (mIoU, mF1, mPrecision, mRecall) are over the classes present in the ground truth of the
evaluated split, one convention for all four: a class absent from it has no IoU, F1, precision or
recall, is reported as ``null`` per class, and is left out of every mean (its count is in
``absent_classes``); a present class that is never predicted has precision 0 (no correct
prediction of it), reported and averaged as such. Shared by segmentation and single-label
classification.
"""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from deflect.data import DataSpec
from deflect.tasks.base import Metric


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


class ConfusionMetric(Metric):
    """One confusion matrix ``[target, prediction]`` over the evaluated pixels (or images),
    ``ignore_index`` left out, summed across ranks (torchmetrics)."""

    def __init__(self, data: DataSpec, device: torch.device, count: str = "pixels") -> None:
        if not data.classes:
            raise ValueError("the data description has no classes to evaluate")
        self.class_names = list(data.classes)
        self.count = count
        self.confusion = MulticlassConfusionMatrix(
            data.num_classes, ignore_index=data.ignore_index, sync_on_compute=True
        ).to(device)

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.confusion.update(output.argmax(dim=1), target)

    def compute(self) -> dict:
        matrix = self.confusion.compute().cpu()
        result = metrics_from_confusion(matrix, self.class_names)
        if self.count != "pixels":
            result[self.count] = result.pop("pixels")
        result["confusion_matrix"] = matrix.tolist()
        return result
