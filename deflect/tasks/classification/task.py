"""Image classification: one class per image (single-label) or a set of labels (multi-label).

The head is :class:`segmentors.classifier.ImageClassifier`, a linear layer on the encoder's
pooled final tokens. Inputs of any size reach the encoder at ``img_size`` (the transform resizes
them, NaN-aware, or crops their centre), so a test image is one forward pass.

Metrics:

* single-label: overall accuracy (OA), per-class precision, recall and F1 and their means over
  the classes present in the split's ground truth, and the confusion matrix;
* multi-label: at ``threshold`` on the sigmoid probabilities, micro F1 (over every label
  decision) and macro F1 (``mF1``), per-label F1; the average precision of each label
  (threshold-free) and their mean (``mAP``).

One convention for every macro mean, as for segmentation: a class (label) absent from the
split's ground truth has no F1, precision or recall (``null``) and is left out of every mean; a
present class that is never predicted has precision 0, shown and averaged. Images without a
valid pixel are not scored (their label is ``ignore_index``). A multi-label split in which no
label has a positive has NaN macro means, with a warning.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelStatScores

from datasets.folder import log_once
from datasets.transforms import build_classification_transform
from deflect.data import DataSpec, check_bool
from deflect.pictures import save_confusion_png
from deflect.tasks.base import InferenceSettings, Metric, Task
from deflect.tasks.classification.tables import classification_table
from deflect.tasks.classification.writer import ClassificationWriter
from deflect.tasks.confusion import ConfusionMetric
from deflect.tasks.registry import register_task
from deflect.tasks.weights import class_weights
from segmentors.losses import class_weight_tensor

INPUT_MODES = ("resize", "center_crop")
log = logging.getLogger(__name__)
#: The run-folder file recording the size of the training images (:func:`chip_size`).
INPUT_RECORD = "input.json"


def chip_size(dataset, samples: int = 16) -> tuple[int, int]:
    """The training images' ``(height, width)`` before they are brought to ``img_size``: the
    most common size among the first ``samples`` images of ``dataset`` (an image-level dataset
    with ``read_image``). It is the ground footprint the model learnt from, so
    ``scripts/predict.py`` cuts scenes into tiles of this size and brings each to ``img_size``
    as evaluation brings a chip."""
    sizes = [tuple(np.shape(dataset.read_image(i))[-2:]) for i in range(min(samples, len(dataset)))]
    return max(sorted(set(sizes)), key=sizes.count)


class SingleLabelMetric(ConfusionMetric):
    """The confusion matrix of image-level classes: OA, precision, recall, F1 (no IoU)."""

    def __init__(self, data: DataSpec, device: torch.device) -> None:
        super().__init__(data, device, count="samples")

    def compute(self) -> dict:
        result = super().compute()
        result.pop("mIoU", None)
        for values in result["per_class"].values():
            values.pop("IoU", None)
        return result


class MultiLabelMetric(Metric):
    """Label decisions at ``threshold`` on the probabilities, and each label's average
    precision, summed across ranks (torchmetrics)."""

    def __init__(self, data: DataSpec, device: torch.device, threshold: float) -> None:
        self.class_names = list(data.classes)
        self.threshold = threshold
        k, ignore = data.num_classes, data.ignore_index
        self.stats = MultilabelStatScores(k, average=None, ignore_index=ignore,
                                          sync_on_compute=True).to(device)  # fmt: skip
        self.ap = MultilabelAveragePrecision(k, average=None, thresholds=None, ignore_index=ignore,
                                             sync_on_compute=True).to(device)  # fmt: skip

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        probabilities = torch.sigmoid(output.float())  # (B, K)
        decisions = (probabilities >= self.threshold).int()
        labels = target.int()
        self.stats.update(decisions, labels)
        self.ap.update(probabilities, labels)

    def compute(self) -> dict:
        stats = self.stats.compute().double().cpu()  # (K, 5): tp, fp, tn, fn, support
        tp, fp, fn, support = stats[:, 0], stats[:, 1], stats[:, 3], stats[:, 4]
        present = support > 0
        with torch.no_grad(), warnings.catch_warnings():
            # A label without a positive in the split has no AP: n/a below, out of mAP.
            warnings.filterwarnings("ignore", message="No positive samples found")
            ap = self.ap.compute().double().cpu()  # (K,), NaN for labels without positives
        f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), 0.0)
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), 0.0)
        recall = torch.where(support > 0, tp / support.clamp_min(1), 0.0)
        per_class = {}
        for i, name in enumerate(self.class_names):
            ok = bool(present[i])
            per_class[name] = {
                "F1": float(f1[i]) if ok else None,
                "Precision": float(precision[i]) if ok else None,
                "Recall": float(recall[i]) if ok else None,
                "AP": float(ap[i]) if ok and math.isfinite(float(ap[i])) else None,
                "support": int(support[i]),
            }

        def mean(values: torch.Tensor) -> float:
            return float(values[present].mean()) if present.any() else float("nan")

        if not present.any():
            log.warning(
                "no label has a positive among the %d scored samples (every label set is "
                "empty): mF1, mPrecision, mRecall and mAP are undefined (NaN); microF1 and the "
                "per-label false positives still count. Evaluate on a split with labels",
                int(stats[0, :4].sum()),
            )  # fmt: skip
        micro_den = 2 * tp.sum() + fp.sum() + fn.sum()
        return {
            "mF1": mean(f1),
            "microF1": float(2 * tp.sum() / micro_den) if micro_den > 0 else float("nan"),
            "mAP": mean(torch.nan_to_num(ap, nan=0.0)),
            "mPrecision": mean(precision),
            "mRecall": mean(recall),
            "absent_classes": int((~present).sum()),
            "samples": int(stats[0, :4].sum()),
            "threshold": self.threshold,
            "per_class": per_class,
        }


class ClassificationLoss(nn.Module):
    """Cross-entropy (single-label; ``ignore_index`` labels left out, optional class weights and
    label smoothing) or binary cross-entropy per label (multi-label; optional per-label
    weights on the positives)."""

    def __init__(self, num_classes: int, multi_label: bool, ignore_index: int = -1,
                 class_weights: list[float] | None = None, label_smoothing: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("weight", class_weight_tensor(class_weights, num_classes),
                             persistent=False)  # fmt: skip
        self.multi_label = multi_label
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.multi_label:
            # An image without a valid pixel has ignore_index in every entry: left out.
            valid = target != self.ignore_index  # (B, K)
            loss = F.binary_cross_entropy_with_logits(
                logits, target.float().clamp(0, 1), pos_weight=self.weight, reduction="none"
            )  # (B, K)
            return (loss * valid).sum() / valid.sum().clamp_min(1)
        return F.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_index,
                               label_smoothing=self.label_smoothing)  # fmt: skip


@register_task
class ClassificationTask(Task):
    """Image-level classes (see the module docstring).

    Args:
        multi_label: each image has a set of labels (sigmoid per label, binary cross-entropy)
            instead of one class (softmax, cross-entropy).
        threshold: a label is predicted where its probability is at least this (multi-label).
        pooling: how the head pools the final tokens: ``cls``, ``mean`` or ``cls_mean``.
        dropout: dropout before the linear layer.
        input: how images of another size reach ``img_size``: ``resize`` (bilinear, NaN-aware)
            or ``center_crop`` (padded with NaN when smaller).
    """

    name = "classification"
    target_key = "label"
    per_class_metric = "F1"
    min_batch_size = 1  # the linear head has no batch statistics

    def __init__(self, multi_label: bool = False, threshold: float = 0.5, pooling: str = "cls",
                 dropout: float = 0.0, input: str = "resize") -> None:  # fmt: skip
        for key, value, low_in in (("threshold", threshold, False), ("dropout", dropout, True)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and (0 <= value if low_in else 0 < value) and value < 1):
                raise ValueError(
                    f"task.{key}={value!r}: expected a number in {'[' if low_in else '('}0, 1)"
                )
        if input not in INPUT_MODES:
            raise ValueError(f"task.input={input!r}: use one of {list(INPUT_MODES)}")
        self.multi_label = check_bool(multi_label, "task.multi_label")
        self.threshold = float(threshold)
        self.pooling = pooling
        self.dropout = float(dropout)
        self.input = input
        names = (
            ("mF1", "microF1", "mAP", "mPrecision", "mRecall")
            if self.multi_label
            else ("mF1", "OA", "mPrecision", "mRecall")
        )
        self.monitors = dict.fromkeys(names, True)

    @property
    def table_metrics(self) -> tuple[str, ...]:
        """``mF1`` and ``OA``; for label sets ``mF1``, ``microF1`` and ``mAP``."""
        return tuple(self.monitors)[: 3 if self.multi_label else 2]

    def build_model(self, encoder: nn.Module, data: DataSpec, head_config=None) -> nn.Module:
        from segmentors.classifier import ImageClassifier

        return ImageClassifier(encoder, data.num_classes, self.pooling, self.dropout)

    def build_loss(self, loss_config, data: DataSpec, class_frequencies=None) -> nn.Module:
        return ClassificationLoss(
            data.num_classes, self.multi_label, data.ignore_index,
            class_weights(loss_config.get("class_weights"), data, class_frequencies),
            float(loss_config.get("label_smoothing", 0.0)),
        )  # fmt: skip

    def has_signal(self, batch: dict, data: DataSpec) -> bool:
        return bool((batch["label"] != data.ignore_index).any())

    def transform(self, spec: DataSpec, train: bool, img_size: int, augmentation=None):
        """The image brought to ``img_size`` (``task.input``), flipped in training."""
        aug = augmentation or {}
        flips = {key: aug[key] for key in ("hflip", "vflip", "rot90") if key in aug}
        return build_classification_transform(spec, train=train, size=img_size, mode=self.input,
                                              **flips)  # fmt: skip

    def check_inputs(self, dataset, img_size: int) -> None:
        """Log once what happens to images of another size than ``img_size`` (their first
        sample's size): upsampling small chips costs time and invents no detail."""
        height, width = dataset.read_sample(0)[0].shape[-2:]
        if (height, width) == (img_size, img_size):
            return
        how = "resized" if self.input == "resize" else "centre-cropped (or padded with no-data)"
        log_once(log.info, (
            f"{type(dataset).__name__}: images are {height}x{width} px (the first one read), "
            f"{how} to img_size={img_size} (task.input={self.input}): set "
            f"dataset.img_size={max(height, width)} (or img_size=...) to train at their own size"
        ))  # fmt: skip

    def run_records(self, dataset) -> dict[str, dict]:
        """``input.json``: the training images' size (:func:`chip_size`)."""
        return {INPUT_RECORD: {"chip_size": list(chip_size(dataset))}}

    def infer(self, model, images, metadata, settings: InferenceSettings, data: DataSpec):
        return model(images, **metadata)  # (B, K): images arrive at img_size

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            return (torch.sigmoid(output.float()) >= self.threshold).int()
        return output.argmax(dim=1)

    def probabilities(self, output: torch.Tensor) -> torch.Tensor:
        """Per-class probabilities: sigmoid (multi-label) or softmax."""
        output = output.float()
        return torch.sigmoid(output) if self.multi_label else torch.softmax(output, dim=1)

    def metric(self, data: DataSpec, device: torch.device) -> Metric:
        if self.multi_label:
            return MultiLabelMetric(data, device, self.threshold)
        return SingleLabelMetric(data, device)

    def log_line(self, metrics: dict) -> str:
        if self.multi_label:
            return (f"mF1 {100 * metrics['mF1']:.2f}  microF1 {100 * metrics['microF1']:.2f}  "
                    f"mAP {100 * metrics['mAP']:.2f}")  # fmt: skip
        return f"mF1 {100 * metrics['mF1']:.2f}  OA {100 * metrics['OA']:.2f}"

    def scalars(self, prefix: str, metrics: dict) -> dict[str, float]:
        out = {f"{prefix}/{k}": metrics[k] for k in self.monitors}
        for name, values in metrics["per_class"].items():
            out[f"{prefix}_F1/{name}"] = values["F1"]
        return out

    def table(self, metrics: dict, title: str) -> str:
        return classification_table(metrics, title, self.multi_label)

    def writer(self, dataset, out_dir, num_vis: int, save: bool, is_main: bool, info=None):
        return ClassificationWriter(dataset, out_dir, num_vis, is_main, self, info)

    def test_pictures(self, metrics: dict, data: DataSpec, out_dir: Path) -> None:
        """The confusion matrix (single-label; label sets have none)."""
        if "confusion_matrix" in metrics:
            save_confusion_png(metrics["confusion_matrix"], list(data.classes),
                               Path(out_dir) / "confusion_matrix.png")  # fmt: skip

    def scene_writer(self):
        from deflect.tasks.classification.scenes import ClassificationScenes

        return ClassificationScenes()
