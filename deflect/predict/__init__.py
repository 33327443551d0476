"""Whole-scene prediction in bounded memory: a trained run folder over GeoTIFF scenes of any size.

    from deflect.predict import load_predictor, predict_scenes
    predictor = load_predictor("work_dirs/<run>", device="cuda")
    predict_scenes(predictor, ["scenes/"], "predictions/", probabilities=True)

One module per job, above the engine (it loads runs with it) and the tasks (each writes what it
predicts):

* :mod:`~deflect.predict.run`: a run folder loaded (:func:`load_predictor`, :class:`Predictor`,
  :func:`resolve_run_dir`);
* :mod:`~deflect.predict.listing`: which files are scenes (:func:`list_scenes`) and which of
  their bands the model takes (:func:`select_bands`);
* :mod:`~deflect.predict.reading`: a scene opened, read and normalised as the data pipeline
  reads training samples (:func:`read_valid`, :func:`read_normalised`), and its reflectance
  scale checked (:func:`band_medians`, :func:`check_reflectance_scale`);
* :mod:`~deflect.predict.blocks`: the block loop over evaluation's tile grid
  (:mod:`deflect.tiling`), and the open scene handed to a task (:class:`SceneSource`);
* :mod:`~deflect.predict.driver`: scenes and chips predicted (:func:`predict_scene`,
  :func:`predict_scenes`), each written by the run's task (``Task.scene_writer``).

A segmentation map equals evaluation's sliding window (:func:`~deflect.tiling.
sliding_window_logits`) run over the whole scene at once, pixel for pixel: the same global grid
of ``window`` x ``window`` tiles (:func:`~deflect.tiling.window_starts` over the full height
and width, the last tile flush with the edge, NaN padding for scenes smaller than the window),
logits summed over the tiles covering a pixel and divided by their count. Neither the scene nor
its logits are ever held whole: the output is made in square blocks of ``block`` pixels (a
multiple of the stride); for each block only the tiles of the global grid that intersect it
are read (one windowed read of their union), run in batches and averaged in a buffer the size
of the block, which is then written. Tiles straddling two blocks are computed once for each:
memory stays bounded by the block, never by the scene.

Inputs are prepared as the data pipeline prepares training samples (``datasets/base.py``
``read_sample`` and ``datasets/transforms.py`` ``JointTransform``): bands picked by name in the
model's order, non-finite pixels and the training no-data value become NaN, then
``(x - mean) / std`` per band with the run's statistics.

A classification run follows evaluation's rule for a test image instead
(:mod:`deflect.tasks.classification.scenes`): a scene is cut into tiles of the training chips'
size, one output pixel per tile; files no larger than a chip are classified whole into one
table, ``predictions.csv``.
"""

from deflect.geotiff import NODATA_CLASS
from deflect.predict.blocks import DEFAULT_BLOCK, SceneSource, predict_block
from deflect.predict.driver import SceneOutputs, predict_scene, predict_scenes, read_chips
from deflect.predict.listing import OUTPUT_ENDINGS, SCENE_SUFFIXES, list_scenes, select_bands
from deflect.predict.reading import (
    SCALE_CHECK_SIZE,
    SceneInput,
    band_medians,
    check_reflectance_scale,
    open_scene,
    read_normalised,
    read_valid,
    scene_profile,
)
from deflect.predict.run import (
    Predictor,
    default_stride,
    file_patterns,
    load_predictor,
    resolve_run_dir,
)
from deflect.tiling import blocks, round_block

__all__ = [
    "DEFAULT_BLOCK",
    "NODATA_CLASS",
    "OUTPUT_ENDINGS",
    "SCALE_CHECK_SIZE",
    "SCENE_SUFFIXES",
    "Predictor",
    "SceneInput",
    "SceneOutputs",
    "SceneSource",
    "band_medians",
    "blocks",
    "check_reflectance_scale",
    "default_stride",
    "file_patterns",
    "list_scenes",
    "load_predictor",
    "open_scene",
    "predict_block",
    "predict_scene",
    "predict_scenes",
    "read_chips",
    "read_normalised",
    "read_valid",
    "resolve_run_dir",
    "round_block",
    "scene_profile",
    "select_bands",
]
