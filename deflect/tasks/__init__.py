"""Tasks: what depends on what is predicted (see :mod:`deflect.tasks.base`).

``segmentation`` (a class per pixel), ``classification`` (a class, or a set of labels, per
image) and ``regression`` (continuous targets per pixel). Each is a package that owns its head's construction, loss, transform, inference, metric
accumulator and monitors (with their direction), log line, tables, test outputs and pictures,
and registers its :class:`Task` by name (:func:`register_task`); the engine builds the run's one
task from ``task.name`` (:func:`build_task`) and asks it, never naming a task or a metric.

A new task touches:

* ``deflect/tasks/<name>/``: ``task.py`` (a :class:`Task` subclass with ``@register_task``),
  its metrics, tables and writer; imported below so that it registers;
* its head in ``segmentors/`` when no existing head fits;
* ``configs/task/<name>.yaml`` (``name: <name>`` and the task's options) and its loss's
  ``configs/loss/<name>.yaml``;
* the dataset (a YAML that selects the task, and a target the transform reads);
* tests.

Tasks depend only on engine-neutral parts (:mod:`deflect.data`, :mod:`deflect.io`,
:mod:`deflect.pictures`, :mod:`deflect.geotiff`, ``datasets``, ``segmentors``), never on
:mod:`deflect.engine` (``tests/test_layers.py`` checks it).
"""

from deflect.tasks.base import InferenceSettings, Metric, Task
from deflect.tasks.classification import ClassificationLoss, ClassificationTask
from deflect.tasks.registry import TASKS, build_task, register_task, task_class
from deflect.tasks.regression import RegressionTask
from deflect.tasks.segmentation import SegmentationTask

__all__ = [
    "TASKS",
    "ClassificationLoss",
    "ClassificationTask",
    "InferenceSettings",
    "Metric",
    "RegressionTask",
    "SegmentationTask",
    "Task",
    "build_task",
    "register_task",
    "task_class",
]
