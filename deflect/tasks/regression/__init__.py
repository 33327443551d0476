"""Pixel-wise regression: continuous targets per pixel (see :mod:`deflect.tasks.regression.task`)."""

from deflect.tasks.regression.loss import RegressionLoss
from deflect.tasks.regression.metrics import (
    HIGHER_IS_BETTER,
    RegressionMetric,
    metrics_from_sums,
    regression_sums,
)
from deflect.tasks.regression.outputs import (
    RegressionWriter,
    save_error_panels,
    save_scatter_png,
    write_regression_geotiff,
)
from deflect.tasks.regression.task import RegressionTask, regression_table

__all__ = [
    "HIGHER_IS_BETTER",
    "RegressionLoss",
    "RegressionMetric",
    "RegressionTask",
    "RegressionWriter",
    "metrics_from_sums",
    "regression_sums",
    "regression_table",
    "save_error_panels",
    "save_scatter_png",
    "write_regression_geotiff",
]
