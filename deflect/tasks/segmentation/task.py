"""Semantic segmentation: a class per pixel (UperNet on the encoder's feature pyramid)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from deflect.data import DataSpec
from deflect.tasks.base import InferenceSettings, Metric, Task
from deflect.tiling import sliding_window_logits


class ConfusionMetric(Metric):
    """One confusion matrix ``[target, prediction]`` over the evaluated pixels (or images),
    ``ignore_index`` left out, summed across ranks (torchmetrics)."""

    def __init__(self, data: DataSpec, device: torch.device, count: str = "pixels") -> None:
        self.class_names = list(data.classes)
        self.count = count
        self.confusion = MulticlassConfusionMatrix(
            data.num_classes, ignore_index=data.ignore_index, sync_on_compute=True
        ).to(device)

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.confusion.update(output.argmax(dim=1), target)

    def compute(self) -> dict:
        from deflect.engine.evaluator import metrics_from_confusion

        matrix = self.confusion.compute().cpu()
        result = metrics_from_confusion(matrix, self.class_names)
        if self.count != "pixels":
            result[self.count] = result.pop("pixels")
        result["confusion_matrix"] = matrix.tolist()
        return result


def class_weights(setting, data: DataSpec, frequencies) -> list[float] | None:
    """``loss.class_weights``: a list, null, or ``median_frequency`` (from the dataset YAML's
    ``class_frequencies``, e.g. MADOS's published ones)."""
    if setting is None:
        return None
    if isinstance(setting, str):
        if setting != "median_frequency":
            raise ValueError(
                f"loss.class_weights={setting!r}: give a list of {data.num_classes} numbers, "
                "null, or median_frequency"
            )
        if not frequencies or len(frequencies) != data.num_classes:
            raise ValueError(
                "loss.class_weights=median_frequency needs dataset.class_frequencies with one "
                f"value per class ({data.num_classes}); the dataset YAML has "
                f"{None if not frequencies else len(frequencies)}"
            )
        return median_frequency_weights([float(f) for f in frequencies])
    return [float(w) for w in setting]


def median_frequency_weights(frequencies: list[float]) -> list[float]:
    """Median frequency balancing (Eigen & Fergus, ICCV 2015): w_c = median(f) / f_c."""
    if any(not f > 0 for f in frequencies):
        raise ValueError(
            f"class frequencies {frequencies} must all be positive for median_frequency weights"
        )
    ordered = sorted(frequencies)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return [median / f for f in frequencies]


class SegmentationTask(Task):
    """A class per pixel: UperNet (the ``segmentor`` group) on the encoder; cross-entropy (and
    dice) over labelled pixels; a sliding window over test images; IoU, F1, precision and recall
    per class from one confusion matrix; GeoTIFF predictions and picture panels."""

    name = "segmentation"
    target_key = "mask"
    monitors = ("mIoU", "mF1", "mPrecision", "mRecall", "OA")
    # UperNet's BatchNorm normalises over the batch: its pyramid pooling's 1x1 branch has one
    # value per channel per image.
    min_batch_size = 2

    def build_model(self, encoder: nn.Module, data: DataSpec, head_config) -> nn.Module:
        from hydra.utils import instantiate

        return instantiate(head_config, encoder=encoder, num_classes=data.num_classes,
                           _convert_="all")  # fmt: skip

    def build_loss(self, loss_config, data: DataSpec, class_frequencies=None) -> nn.Module:
        from segmentors import SegmentationLoss

        return SegmentationLoss(
            num_classes=data.num_classes,
            ignore_index=data.ignore_index,
            class_weights=class_weights(
                loss_config.get("class_weights"), data, class_frequencies
            ),  # fmt: skip
            dice_weight=float(loss_config.get("dice_weight", 0.0)),
        )

    def has_signal(self, batch: dict, data: DataSpec) -> bool:
        # Asked of the mask still on the host: on a GPU, asking the device copy would wait
        # for the forward pass to finish before the backward pass could be queued.
        return bool((batch["mask"] != data.ignore_index).any())

    def infer(self, model, images, metadata, settings: InferenceSettings, num_classes: int):
        return sliding_window_logits(model, images, settings.window, settings.step, num_classes,
                                     **metadata)  # fmt: skip

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=1)

    def metric(self, data: DataSpec, device: torch.device) -> Metric:
        return ConfusionMetric(data, device)

    def log_line(self, metrics: dict) -> str:
        return (f"mIoU {100 * metrics['mIoU']:.2f}  mF1 {100 * metrics['mF1']:.2f}  "
                f"OA {100 * metrics['OA']:.2f}")  # fmt: skip

    def scalars(self, prefix: str, metrics: dict) -> dict[str, float]:
        from deflect.engine.logging import metric_scalars

        return metric_scalars(prefix, metrics)

    def table(self, metrics: dict, title: str) -> str:
        from deflect.engine.logging import metrics_table

        return metrics_table(metrics, title)

    def writer(self, dataset, out_dir, num_vis: int, save: bool, is_main: bool, info=None):
        from deflect.engine.outputs import PredictionWriter

        return PredictionWriter(dataset, out_dir, num_vis, save, is_main)

    def scene_writer(self):
        from deflect.tasks.segmentation.scenes import SegmentationScenes

        return SegmentationScenes()
