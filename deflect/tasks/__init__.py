"""Tasks: what depends on what is predicted (see :mod:`deflect.tasks.base`).

``segmentation`` (a class per pixel) and ``classification`` (a class, or a set of labels, per
image). Adding a task is one module here, its head in ``segmentors/``, a YAML in
``configs/task/`` (and its loss's in ``configs/loss/``), and a dataset YAML that selects it.
"""

from deflect.tasks.base import InferenceSettings, Metric, Task
from deflect.tasks.classification import ClassificationLoss, ClassificationTask
from deflect.tasks.segmentation import SegmentationTask

__all__ = [
    "ClassificationLoss",
    "ClassificationTask",
    "InferenceSettings",
    "Metric",
    "SegmentationTask",
    "Task",
]
