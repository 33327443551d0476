"""Classification: a class, or a set of labels, per image (see
:mod:`deflect.tasks.classification.task`)."""

from deflect.tasks.classification.task import (
    INPUT_RECORD,
    ClassificationLoss,
    ClassificationTask,
    chip_size,
)
from deflect.tasks.classification.writer import ClassificationWriter

__all__ = [
    "INPUT_RECORD",
    "ClassificationLoss",
    "ClassificationTask",
    "ClassificationWriter",
    "chip_size",
]
