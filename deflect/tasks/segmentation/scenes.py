"""Segmentation's whole-scene outputs for ``scripts/predict.py``: a class map and, on request,
the class probabilities, written block by block as the scene's logits come.

The scene code reaches this module through :meth:`SegmentationTask.scene_writer`; what it is
given (the predictor and the open scene, with ``dense_blocks``, ``profile``, ``path``,
``forwards``) comes from :mod:`deflect.predict`, which this module never imports: the tasks sit
below the scene driver.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import rasterio
import torch

# The class-map helpers (integrator: their neutral home after the engine branch's move).
from deflect.data import DataSpec
from deflect.geotiff import NODATA_CLASS, describe_classes
from deflect.io import atomic_path
from deflect.tasks.dense import every_file_a_scene

log = logging.getLogger(__name__)


def check_classes(spec: DataSpec, source: str) -> None:
    """Refuse a band manifest whose classes cannot be written as a uint8 class map.

    Raises:
        ValueError: no classes (not a trained model), or more than :data:`NODATA_CLASS`.
    """
    if not spec.classes:
        raise ValueError(f"the band manifest of {source} has no classes; it is not a trained model")
    if spec.num_classes > NODATA_CLASS:
        raise ValueError(
            f"the run has {spec.num_classes} classes but the class map is uint8 with "
            f"{NODATA_CLASS} for no data; at most {NODATA_CLASS} classes can be written"
        )


def write_class_map(predictor, scene, out_dir: Path, probabilities: bool,
                    progress: bool) -> tuple[Path, Path | None, int]:  # fmt: skip
    """Write ``<stem>_pred.tif`` (uint8 class indices, :data:`NODATA_CLASS` where every band is
    invalid, with a colour table and each value's class name, :func:`describe_classes`) and,
    with ``probabilities``, ``<stem>_prob.tif`` (float32 softmax, one band per class named after
    it, NaN where every band is invalid), from the scene's averaged logits block by block
    (``scene.dense_blocks``). Both atomically: a failure leaves no partial file.

    Returns:
        The class map, the probabilities (or None) and the tiles run.
    """
    spec, path = predictor.spec, scene.path
    pred_path = out_dir / f"{path.stem}_pred.tif"
    prob_path = out_dir / f"{path.stem}_prob.tif" if probabilities else None
    with ExitStack() as stack:
        blocks = scene.dense_blocks(progress)
        tmp = stack.enter_context(atomic_path(pred_path))
        pred = stack.enter_context(
            rasterio.open(tmp, "w", **scene.profile(1, "uint8", NODATA_CLASS))
        )
        describe_classes(pred, spec.classes)
        pred.update_tags(run=str(predictor.run_dir or ""))
        prob = None
        if prob_path is not None:
            tmp_prob = stack.enter_context(atomic_path(prob_path))
            prob = stack.enter_context(
                rasterio.open(tmp_prob, "w", **scene.profile(spec.num_classes, "float32", np.nan))
            )
            for k, name in enumerate(spec.classes):
                prob.set_band_description(k + 1, name)
            prob.update_tags(classes=",".join(spec.classes), run=str(predictor.run_dir or ""))
        for out_window, logits, invalid in blocks:
            classes = logits.argmax(dim=0).numpy().astype(np.uint8)
            classes[invalid] = NODATA_CLASS
            pred.write(classes, 1, window=out_window)
            if prob is not None:
                softmax = torch.softmax(logits, dim=0).numpy()
                softmax[:, invalid] = np.nan
                prob.write(softmax, window=out_window)
    log.info(
        "%s: %d x %d px, %d blocks of %d px, %d tiles -> %s",
        path.name, scene.src.height, scene.src.width, scene.block_count, scene.block, scene.forwards,
        pred_path,
    )  # fmt: skip
    return pred_path, prob_path, scene.forwards


class SegmentationScenes:
    """What ``scripts/predict.py`` writes for a segmentation run: a class map per scene, made by
    the sliding window; every file is a scene."""

    def prepare(self, run_dir: Path, spec: DataSpec, window: int, source: str) -> None:
        """Check the manifest's classes; no tiles (None): one output pixel per scene pixel."""
        check_classes(spec, source)
        return None

    def split(self, predictor, paths: list[Path], chips: bool | None) -> tuple[list, list]:
        """No chips: every file is a scene (:func:`~deflect.tasks.dense.every_file_a_scene`)."""
        return every_file_a_scene("segmentation", predictor.run_dir, paths, chips)

    def write_scene(self, predictor, scene, out_dir: Path, probabilities: bool,
                    progress: bool) -> tuple[Path, Path | None, int]:  # fmt: skip
        """The class map (and probabilities) of one scene (:func:`write_class_map`)."""
        return write_class_map(predictor, scene, out_dir, probabilities, progress)
