"""Regression's whole-scene output for ``scripts/predict.py``: a float32 GeoTIFF, one band per
target named after it, written block by block as the scene's averaged outputs come (the same
sliding window as evaluation), ``task.nodata`` where every input band is invalid, as the test
split's ``predictions/*.tif`` (:mod:`deflect.tasks.regression.outputs`).

The scene code reaches this module through :meth:`RegressionTask.scene_writer`; what it is
given (the predictor and the open scene, with ``dense_blocks``, ``profile``, ``path``,
``forwards``) comes from :mod:`deflect.predict`, which this module never imports.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

import rasterio

from deflect.data import DataSpec
from deflect.io import atomic_path
from deflect.tasks.dense import every_file_a_scene

log = logging.getLogger(__name__)


class RegressionScenes:
    """What ``scripts/predict.py`` writes for a regression run: every file is a scene, mapped
    to ``<stem>_pred.tif``.

    Args:
        task: the run's :class:`~deflect.tasks.regression.task.RegressionTask` (its targets'
            names and no-data value).
    """

    def __init__(self, task) -> None:
        self.task = task

    def prepare(self, run_dir: Path, spec: DataSpec, window: int, source: str) -> None:
        """Check that the targets are named (:meth:`RegressionTask.target_names`); no tiles
        (None): one output pixel per scene pixel."""
        self.task.target_names(spec)
        return None

    def split(self, predictor, paths: list[Path], chips: bool | None) -> tuple[list, list]:
        """No chips: every file is a scene (:func:`~deflect.tasks.dense.every_file_a_scene`)."""
        return every_file_a_scene("regression", predictor.run_dir, paths, chips)

    def write_scene(self, predictor, scene, out_dir: Path, probabilities: bool,
                    progress: bool) -> tuple[Path, None, int]:  # fmt: skip
        """``<stem>_pred.tif``: float32, one band per target (described by its name, the names
        also in the file tag ``targets``), ``task.nodata`` declared and written where every
        band is invalid; tiled, deflate-compressed, with the scene's CRS and transform, written
        atomically. ``probabilities`` has no meaning for continuous targets: nothing more is
        written (said in the log)."""
        names = self.task.target_names(predictor.spec)
        nodata = self.task.nodata
        if probabilities:
            log.warning("--probabilities: a regression run has no probabilities; writing the "
                        "predicted values only")  # fmt: skip
        path = out_dir / f"{scene.path.stem}_pred.tif"
        with ExitStack() as stack:
            blocks = scene.dense_blocks(progress)
            tmp = stack.enter_context(atomic_path(path))
            dst = stack.enter_context(
                rasterio.open(tmp, "w", **scene.profile(len(names), "float32", nodata))
            )
            for t, name in enumerate(names):
                dst.set_band_description(t + 1, name)
            dst.update_tags(targets=",".join(names), run=str(predictor.run_dir or ""))
            for out_window, values, invalid in blocks:
                values = values.numpy()
                if values.shape[0] != len(names):
                    raise ValueError(
                        f"the model gives {values.shape[0]} outputs per pixel but the run names "
                        f"{len(names)} targets ({names}); set task.targets to its targets"
                    )
                values[:, invalid] = nodata
                dst.write(values, window=out_window)
        log.info("%s: %d x %d px, %d targets, %d tiles -> %s", scene.path.name, scene.src.height,
                 scene.src.width, len(names), scene.forwards, path)  # fmt: skip
        return path, None, scene.forwards
