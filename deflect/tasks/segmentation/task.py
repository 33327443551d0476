"""Semantic segmentation: a class per pixel (UperNet on the encoder's feature pyramid)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deflect.data import DataSpec
from deflect.pictures import save_confusion_png
from deflect.tasks.base import InferenceSettings, Metric, Task
from deflect.tasks.confusion import ConfusionMetric
from deflect.tasks.dense import dense_transform
from deflect.tasks.registry import register_task
from deflect.tasks.segmentation.tables import metric_scalars, metrics_table
from deflect.tasks.segmentation.writer import PredictionWriter
from deflect.tasks.weights import class_weights
from deflect.tiling import sliding_window_logits


@register_task
class SegmentationTask(Task):
    """A class per pixel: UperNet (the ``segmentor`` group) on the encoder; cross-entropy (and
    dice) over labelled pixels; a sliding window over test images; IoU, F1, precision and recall
    per class from one confusion matrix; GeoTIFF predictions and picture panels."""

    name = "segmentation"
    target_key = "mask"
    monitors = {"mIoU": True, "mF1": True, "mPrecision": True, "mRecall": True, "OA": True}
    per_class_metric = "IoU"
    # UperNet's BatchNorm normalises over the batch: its pyramid pooling's 1x1 branch has one
    # value per channel per image.
    min_batch_size = 2
    min_batch_reason = (
        "the decoder's BatchNorm normalises over the batch (the pyramid pooling's 1x1 branch "
        "has one value per channel per image)"
    )

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

    def transform(self, spec: DataSpec, train: bool, img_size: int, augmentation=None):
        """Crops of ``img_size`` with their mask (training: random, with at least
        ``min_labelled_fraction`` labelled pixels, and flips); evaluation: whole tiles."""
        return dense_transform(spec, train, img_size, augmentation)

    def infer(self, model, images, metadata, settings: InferenceSettings, data: DataSpec):
        return sliding_window_logits(model, images, settings.window, settings.step,
                                     data.num_classes, **metadata)  # fmt: skip

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=1)

    def metric(self, data: DataSpec, device: torch.device) -> Metric:
        return ConfusionMetric(data, device)

    def log_line(self, metrics: dict) -> str:
        return (f"mIoU {100 * metrics['mIoU']:.2f}  mF1 {100 * metrics['mF1']:.2f}  "
                f"OA {100 * metrics['OA']:.2f}")  # fmt: skip

    def scalars(self, prefix: str, metrics: dict) -> dict[str, float]:
        return metric_scalars(prefix, metrics)

    def table(self, metrics: dict, title: str) -> str:
        return metrics_table(metrics, title)

    def writer(self, dataset, out_dir, num_vis: int, save: bool, is_main: bool, info=None):
        return PredictionWriter(dataset, out_dir, num_vis, save, is_main)

    def test_pictures(self, metrics: dict, data: DataSpec, out_dir: Path) -> None:
        save_confusion_png(metrics["confusion_matrix"], list(data.classes),
                           Path(out_dir) / "confusion_matrix.png")  # fmt: skip

    def scene_writer(self):
        from deflect.tasks.segmentation.scenes import SegmentationScenes

        return SegmentationScenes()
