"""Pixel-wise regression: one or more continuous targets per pixel (canopy height, biomass, a
spectral index).

A batch's ``target`` is float32 ``(B, T, H, W)``, NaN at every pixel without a valid target.
The head is the segmentation head (the ``segmentor`` group: the feature pyramid and UperNet)
with one output channel per target: it ends in a 1x1 convolution and a bilinear resize, both
linear, so its output is the prediction itself (no softmax, no argmax). A test image is
inferred by the same sliding window, overlapping windows averaged. The losses are in
:mod:`~deflect.tasks.regression.loss`, the metrics in :mod:`~deflect.tasks.regression.metrics`,
the outputs in :mod:`~deflect.tasks.regression.outputs`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deflect.data import DataSpec
from deflect.tasks.base import InferenceSettings, Metric, Task
from deflect.tasks.dense import dense_transform
from deflect.tasks.registry import register_task
from deflect.tasks.regression.loss import RegressionLoss
from deflect.tasks.regression.metrics import HIGHER_IS_BETTER, RegressionMetric
from deflect.tasks.regression.outputs import NODATA, RegressionWriter
from deflect.tiling import sliding_window_logits

#: The table's columns: (heading, metric key, format).
COLUMNS = (("RMSE", "rmse", ".4g"), ("MAE", "mae", ".4g"), ("R²", "r2", ".4f"),
           ("bias", "bias", "+.3g"))  # fmt: skip


def fmt(value, spec: str) -> str:
    """A metric for the log: ``n/a`` when undefined."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        format(value, spec))  # fmt: skip


def regression_table(metrics: dict, title: str) -> str:
    """The per-target table (RMSE, MAE, R², bias, valid pixels) and the means over targets, as
    text."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for heading in ("target", *(c[0] for c in COLUMNS), "valid pixels"):
        table.add_column(heading, justify="left" if heading == "target" else "right")
    for name, values in metrics["per_target"].items():
        table.add_row(name, *(fmt(values[k], s) for _, k, s in COLUMNS), str(values["pixels"]))
    table.add_section()
    table.add_row("mean", *(fmt(metrics[k], s) for _, k, s in COLUMNS), str(metrics["pixels"]))
    with open("/dev/null", "w") as sink:
        console = Console(width=100, record=True, file=sink)
        console.print(table)
        return console.export_text()


@register_task
class RegressionTask(Task):
    """Continuous targets per pixel (see the module docstring).

    Args:
        targets: the targets' names, one per band of the target raster; null takes the data
            description's (``DataSpec.targets``).
        nodata: the prediction GeoTIFFs' value where no input band held data.
    """

    name = "regression"
    target_key = "target"
    #: Per monitor: whether a higher value is better (rmse, the default, and mae: lower is).
    monitors = dict(HIGHER_IS_BETTER)
    #: Errors in the targets' units and R² as they are, never in %.
    metrics_in_percent = False
    #: A comparison table's means: the errors and the explained variance.
    table_metrics = ("rmse", "mae", "r2")
    # UperNet's BatchNorm normalises over the batch (as for segmentation).
    min_batch_size = 2
    min_batch_reason = (
        "the decoder's BatchNorm normalises over the batch (the pyramid pooling's 1x1 branch "
        "has one value per channel per image)"
    )

    def __init__(self, targets=None, nodata: float = NODATA) -> None:
        if targets is not None and (isinstance(targets, str) or not len(targets)):
            raise ValueError(f"task.targets={targets!r}: give a list of names, e.g. [ndvi]")
        if not (isinstance(nodata, (int, float)) and math.isfinite(nodata)):
            raise ValueError(f"task.nodata={nodata!r}: expected a finite number, e.g. -9999")
        self.targets = None if targets is None else tuple(str(t) for t in targets)
        self.nodata = float(nodata)

    def target_names(self, data: DataSpec) -> list[str]:
        """The targets' names: ``task.targets``, else the data description's; they must agree
        when both are given."""
        described = tuple(getattr(data, "targets", None) or ())
        if self.targets and described and self.targets != described:
            raise ValueError(
                f"task.targets={list(self.targets)} but the dataset's targets are "
                f"{list(described)}: leave task.targets null or make them agree"
            )
        names = self.targets or described
        if not names:
            raise ValueError(
                "regression needs the targets' names (one per band of the target raster): set "
                "task.targets, e.g. task.targets=[ndvi]"
            )
        return list(names)

    def better(self, monitor: str, a: float, b: float) -> bool:
        """Whether ``a`` is a better value of ``monitor`` than ``b``."""
        return a > b if self.higher_is_better(monitor) else a < b

    # ---- the model and its training -------------------------------------------------------------
    def build_model(self, encoder: nn.Module, data: DataSpec, head_config) -> nn.Module:
        from hydra.utils import instantiate

        return instantiate(head_config, encoder=encoder, num_classes=len(self.target_names(data)),
                           _convert_="all")  # fmt: skip

    def build_loss(self, loss_config, data: DataSpec, class_frequencies=None) -> nn.Module:
        """The loss of ``configs/loss/regression.yaml``; another task's loss settings (class
        weights, a Dice term) are refused rather than ignored."""
        foreign = sorted(set(loss_config or {}) - {"name", "delta", "target_weights"})
        if foreign:
            raise ValueError(
                f"loss.{foreign[0]} is no setting of a regression loss (it has name, delta, "
                "target_weights): select loss=regression (a regression dataset's YAML does, "
                "with `override /loss@_global_.loss: regression` in its defaults)"
            )
        return RegressionLoss(
            name=loss_config.get("name", "l1"),
            delta=loss_config.get("delta", 1.0),
            target_weights=loss_config.get("target_weights"),
        )

    def has_signal(self, batch: dict, data: DataSpec) -> bool:
        return bool(torch.isfinite(batch["target"]).any())

    def transform(self, spec: DataSpec, train: bool, img_size: int, augmentation=None):
        """Crops of ``img_size`` with their target rasters moved alike (training: random, and
        flips); evaluation: whole tiles."""
        return dense_transform(spec, train, img_size, augmentation)

    # ---- inference and metrics ------------------------------------------------------------------
    def infer(self, model, images, metadata, settings: InferenceSettings, data: DataSpec):
        """The sliding window's average of the overlapping windows' outputs: ``(B, T, H, W)``
        with ``T`` the named targets (the task's, else ``data``'s)."""
        count = len(self.targets) if self.targets else len(self.target_names(data))
        return sliding_window_logits(model, images, settings.window, settings.step, count,
                                     **metadata)  # fmt: skip

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output.float()

    def metric(self, data: DataSpec, device: torch.device) -> Metric:
        return RegressionMetric(self.target_names(data), device)

    def log_line(self, metrics: dict) -> str:
        return "  ".join(f"{k} {fmt(metrics[k], s)}" for _, k, s in COLUMNS[:3])

    def scalars(self, prefix: str, metrics: dict) -> dict[str, float]:
        out = {f"{prefix}/{k}": metrics[k] for _, k, _ in COLUMNS}
        for name, values in metrics["per_target"].items():
            for key in ("rmse", "r2"):
                out[f"{prefix}_{key}/{name}"] = values[key]
        return out

    def table(self, metrics: dict, title: str) -> str:
        return regression_table(metrics, title)

    def writer(self, dataset, out_dir, num_vis: int, save: bool, is_main: bool, info=None):
        return RegressionWriter(dataset, out_dir, self.target_names(dataset.spec), num_vis, save,
                                is_main, info, self.nodata)  # fmt: skip

    def scene_writer(self):
        from deflect.tasks.regression.scenes import RegressionScenes

        return RegressionScenes(self)
