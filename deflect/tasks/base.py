"""What a task owns: everything that depends on what is predicted.

The trainer, the evaluator and the steps of a run (``run.py``: open, describe, train, test the
best checkpoint, close) know nothing of pixels or labels; they ask the run's :class:`Task`:

* the model it attaches to the encoder (:meth:`Task.build_model`) and its loss
  (:meth:`Task.build_loss`, from the ``loss`` config group);
* which key of a batch is the target, and whether a batch carries any training signal;
* how a test image is inferred (:meth:`Task.infer`: a sliding window for segmentation, one
  forward pass for image-level classes) and what the prediction is;
* the transform its samples need (crops with their mask, an image brought to ``img_size``, ...);
* the metric accumulator, the metrics ``monitor`` may select and whether higher or lower is
  better for each (:attr:`Task.monitors`; the first is the default), the line logged per epoch,
  the TensorBoard scalars and the table of the test split;
* what it writes for the test split (prediction GeoTIFFs and panels; ``predictions.csv``) and
  the pictures of its metrics, and what it records in the run folder at start;
* its constraints: the smallest training batch per process.

A task registers itself by name (:func:`deflect.tasks.registry.register_task`); a run builds it
once from ``task.name`` (:func:`deflect.tasks.registry.build_task`) and hands it to every part.
A dataset's YAML selects its task (``override /task@_global_.task: classification``); the
task's options are in ``configs/task/<name>.yaml`` and its loss's in ``configs/loss/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deflect.data import DataSpec


@dataclass(frozen=True)
class InferenceSettings:
    """How a test image is run: the encoder input size, the sliding-window stride (default half
    the window), and the autocast precision."""

    window: int
    stride: int | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.window < 1 or (self.stride is not None and self.stride < 1):
            raise ValueError(f"window {self.window} and stride {self.stride} must be >= 1")

    @property
    def step(self) -> int:
        """The stride in use."""
        return self.stride or max(self.window // 2, 1)


class Metric:
    """An accumulator of one evaluation (summed over ranks): ``update`` per batch, ``compute``
    once."""

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict:
        raise NotImplementedError


class Task:
    """The interface of a task (see the module docstring); each task package subclasses it and
    registers the subclass under its :attr:`name`."""

    #: The task's name, as the config group option names it.
    name: str = ""
    #: The batch key of the target.
    target_key: str = ""
    #: Metrics ``monitor`` may select, each with whether a higher value is better (``True``:
    #: an IoU, an F1; ``False``: an error); the first is the default.
    monitors: dict[str, bool] = {}
    #: The smallest training batch per process, and why (said when a run asks for fewer).
    min_batch_size: int = 1
    min_batch_reason: str = ""

    #: The per-class (or per-target) metric of ``metrics["per_class"]`` that comparison tables
    #: show beside the means (``None``: no such column).
    per_class_metric: str | None = None
    #: Whether the metrics are fractions that tables show in % (IoU, F1); ``False``: in their
    #: own units (an error in metres, R²).
    metrics_in_percent: bool = True

    @property
    def headline(self) -> str:
        """The task's main metric (the default ``monitor``)."""
        return next(iter(self.monitors))

    @property
    def table_metrics(self) -> tuple[str, ...]:
        """The means a comparison table (``scripts/ablation_table.py``) shows, headline first."""
        return tuple(self.monitors)[:2]

    def higher_is_better(self, monitor: str) -> bool:
        """Whether a higher value of ``monitor`` is better.

        Raises:
            ValueError: ``monitor`` is none of the task's monitors (they are named).
        """
        if monitor not in self.monitors:
            raise ValueError(
                f"monitor={monitor!r}: a {self.name} run can monitor {list(self.monitors)} "
                f"(null: {self.headline})"
            )
        return self.monitors[monitor]

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse a training batch smaller than the task's head can learn from."""
        if batch_size < self.min_batch_size:
            raise ValueError(
                f"batch_size={batch_size}: training needs at least {self.min_batch_size} images "
                f"per process and step, since {self.min_batch_reason}; set "
                f"batch_size>={self.min_batch_size} (it is per process under torchrun)"
            )

    # ---- the model and its training -------------------------------------------------------------
    def build_model(self, encoder: nn.Module, data: DataSpec, head_config) -> nn.Module:
        raise NotImplementedError

    def build_loss(self, loss_config, data: DataSpec, class_frequencies=None) -> nn.Module:
        raise NotImplementedError

    def target(self, batch: dict) -> torch.Tensor:
        """The target of a batch (on the host)."""
        return batch[self.target_key]

    def has_signal(self, batch: dict, data: DataSpec) -> bool:
        """Whether a training batch holds anything to learn from (asked on the host)."""
        return True

    # ---- the data -------------------------------------------------------------------------------
    def transform(self, spec: DataSpec, train: bool, img_size: int,
                  augmentation: dict | None = None) -> Callable[[dict], dict]:  # fmt: skip
        """The transform of a sample (normalised by ``spec``) at ``img_size``; ``augmentation``
        holds the ``augmentation`` group's settings (``hflip``, ``vflip``, ``rot90``,
        ``min_labelled_fraction``; used in training only), ``None`` for their defaults."""
        raise NotImplementedError

    def check_inputs(self, dataset, img_size: int) -> None:
        """Say (once) what the transform does to this dataset's images, e.g. a resize."""

    def run_records(self, dataset) -> dict[str, dict]:
        """Files (name -> JSON content) the run folder keeps about the training data, e.g. the
        image size that ``scripts/predict.py`` tiles scenes by."""
        return {}

    # ---- inference and metrics ------------------------------------------------------------------
    def infer(self, model: nn.Module, images: torch.Tensor, metadata: dict,
              settings: InferenceSettings, data: DataSpec) -> torch.Tensor:  # fmt: skip
        """The model's output for a batch of test images (``data``: what the model predicts)."""
        raise NotImplementedError

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """The prediction of an output (classes, or a multi-hot label set)."""
        raise NotImplementedError

    def metric(self, data: DataSpec, device: torch.device) -> Metric:
        raise NotImplementedError

    def log_line(self, metrics: dict) -> str:
        """The means of an evaluation, for the epoch line of the log."""
        raise NotImplementedError

    def scalars(self, prefix: str, metrics: dict) -> dict[str, float]:
        """TensorBoard tags of an evaluation."""
        raise NotImplementedError

    def table(self, metrics: dict, title: str) -> str:
        """The per-class table and the means, as text."""
        raise NotImplementedError

    def writer(self, dataset, out_dir, num_vis: int, save: bool, is_main: bool, info=None):
        """What the test split leaves behind: a callable ``(batch, prediction, output)`` per
        batch with ``finish(out_dir)`` at the end (on every rank: it may gather)."""
        raise NotImplementedError

    def test_pictures(self, metrics: dict, data: DataSpec, out_dir: Path) -> None:
        """Pictures of the test metrics (rank 0), e.g. the confusion matrix."""

    def scene_writer(self):
        """What ``scripts/predict.py`` writes for a scene (driven by :mod:`deflect.predict`, which
        hands in the predictor and the open scene): an object with ``prepare(run_dir, spec,
        window, source)`` (checks the band manifest; returns the tile a scene is cut into per
        output pixel, or None for a per-pixel map by the sliding window), ``split(predictor,
        paths, chips)`` (the files taken as chips, and as scenes), ``write_scene(predictor,
        scene, out_dir, probabilities, progress)`` (returns the prediction's path, the
        probabilities' or None, and the tiles run) and, where ``split`` gives chips,
        ``chip_rows(predictor, paths, images, batch_size)`` and ``write_chip_table(predictor,
        rows, out_dir)``."""
        raise NotImplementedError
