"""Segmentation: a class per pixel (see :mod:`deflect.tasks.segmentation.task`)."""

from deflect.tasks.confusion import ConfusionMetric, metrics_from_confusion
from deflect.tasks.segmentation.task import SegmentationTask
from deflect.tasks.segmentation.writer import PredictionWriter
from deflect.tasks.weights import class_weights, median_frequency_weights

__all__ = [
    "ConfusionMetric",
    "PredictionWriter",
    "SegmentationTask",
    "class_weights",
    "median_frequency_weights",
    "metrics_from_confusion",
]
