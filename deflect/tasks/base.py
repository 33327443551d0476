"""What a task owns: everything that depends on what is predicted.

The trainer, the evaluator and the steps of a run (``run.py``: open, describe, train, test the
best checkpoint, close) know nothing of pixels or labels; they ask the run's :class:`Task`:

* the model it attaches to the encoder (:meth:`Task.build_model`) and its loss
  (:meth:`Task.build_loss`, from the ``loss`` config group);
* which key of a batch is the target, and whether a batch carries any training signal;
* how a test image is inferred (:meth:`Task.infer`: a sliding window for segmentation, one
  forward pass for image-level classes) and what the prediction is;
* the metric accumulator, the metrics ``monitor`` may select (and the default one), the line
  logged per epoch, the TensorBoard scalars and the table of the test split;
* what it writes for the test split (prediction GeoTIFFs and panels; ``predictions.csv``);
* its constraints: the smallest training batch per process.

A dataset's YAML selects its task (``override /task@_global_.task: classification``); the
task's options are in ``configs/task/<name>.yaml`` and its loss's in ``configs/loss/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    """The interface of a task (see the module docstring). Subclasses: segmentation and
    classification."""

    #: The task's name, as the config group option names it.
    name: str = ""
    #: The batch key of the target.
    target_key: str = ""
    #: Metrics ``monitor`` may select (higher is better); the first is the default.
    monitors: tuple[str, ...] = ()
    #: The smallest training batch per process.
    min_batch_size: int = 1

    @property
    def headline(self) -> str:
        """The task's main metric (the default ``monitor``)."""
        return self.monitors[0]

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

    # ---- inference and metrics ------------------------------------------------------------------
    def infer(self, model: nn.Module, images: torch.Tensor, metadata: dict,
              settings: InferenceSettings, num_classes: int) -> torch.Tensor:  # fmt: skip
        """The model's output for a batch of test images."""
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
        batch with ``save(out_dir)`` at the end."""
        raise NotImplementedError

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


OnBatch = Callable[[dict, torch.Tensor, torch.Tensor], None]
