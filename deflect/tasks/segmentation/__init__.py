"""Segmentation: a class per pixel (see :mod:`deflect.tasks.segmentation.task`)."""

from deflect.tasks.segmentation.task import (
    ConfusionMetric,
    SegmentationTask,
    class_weights,
    median_frequency_weights,
)

__all__ = ["ConfusionMetric", "SegmentationTask", "class_weights", "median_frequency_weights"]
