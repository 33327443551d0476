"""Classification's whole-scene outputs for ``scripts/predict.py``, by evaluation's rule for a
test image (:func:`classify_images`): a scene is cut into tiles of the training chips' size
(the run's ``input.json``), each brought to ``img_size`` by the run's evaluation transform,
one output pixel per tile (:func:`classify_tiles`); files no larger than a chip are classified
whole into one table, ``predictions.csv`` (:func:`chip_rows`, :func:`split_chips`).

The scene code reaches this module through :meth:`ClassificationTask.scene_writer`; what it is
given (the predictor with its ``forward``, the open scene with ``read`` and ``profile``, the
chips already read) comes from :mod:`deflect.predict`, which this module never imports: the
tasks sit below the scene driver.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window
from tqdm import tqdm

# The class-map helpers (integrator: their neutral home after the engine branch's move).
from deflect.data import DataSpec
from deflect.geotiff import NODATA_CLASS, describe_classes, describe_labels
from deflect.io import atomic_path
from deflect.tasks.classification.task import INPUT_RECORD
from deflect.tasks.segmentation.scenes import check_classes

log = logging.getLogger(__name__)

#: The table of chips :func:`write_chip_table` writes.
CHIP_TABLE = "predictions.csv"


def recorded_chip_size(run_dir: Path, window: int) -> tuple[int, int]:
    """The size of a classification run's training images, from its ``input.json``; a run
    written before that record existed falls back to ``window`` (its ``img_size``), with a
    warning."""
    path = run_dir / INPUT_RECORD
    try:
        height, width = (int(v) for v in json.loads(path.read_text())["chip_size"])
    except (OSError, ValueError, KeyError, TypeError):
        log.warning(
            "%s records no training chip size (a run written before %s existed): tiles of the "
            "run's img_size (%d px) are taken as the ground footprint of a chip; if its chips "
            "were of another size, predictions on scenes differ from evaluation's",
            run_dir, INPUT_RECORD, window,
        )  # fmt: skip
        return window, window
    return height, width


@torch.no_grad()
def classify_images(
    predictor,
    images: Sequence[torch.Tensor],
    batch_size: int = 8,
    warned: set[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Classify images by evaluation's rule: each ``(C, h, w)`` image (trained units, NaN where
    invalid) goes through the run's evaluation transform
    (:func:`~datasets.transforms.build_classification_transform`, the one ``run.py`` gives
    the test split: brought to ``img_size`` by the NaN-aware resize or the centre crop of
    ``task.input``, then normalised with the run's statistics), then through the model.

    Returns:
        The probabilities ``(n, K)`` and the decisions: classes ``(n,)``, or 0/1 ``(n, K)``
        for a multi-label run.
    """
    from datasets.transforms import build_classification_transform

    task, spec = predictor.task, predictor.spec
    transform = build_classification_transform(spec, False, predictor.window, task.input)
    warned = set() if warned is None else warned
    probabilities, decisions = [], []
    for first in range(0, len(images), batch_size):
        chunk = [transform(image, None)[0] for image in images[first : first + batch_size]]
        batch = torch.stack(chunk)  # (n, C, img_size, img_size), normalised, NaN where invalid
        if predictor.raw_input:  # an exported model normalises inside: back to the trained units
            batch = batch * transform.std[:, None, None] + transform.mean[:, None, None]
        out = predictor.forward(batch, warned)
        probabilities.append(task.probabilities(out).cpu().numpy())
        decisions.append(task.predict(out).cpu().numpy())
    k = spec.num_classes
    if not probabilities:
        return np.zeros((0, k), np.float32), np.zeros((0, k) if task.multi_label else 0, np.int64)
    return np.concatenate(probabilities), np.concatenate(decisions)


def classify_tiles(
    predictor, scene, out_dir: Path, probabilities: bool, progress: bool
) -> tuple[Path, Path | None, int]:
    """A classification run over a scene: the scene cut into tiles of the training chips' size
    (``predictor.tile``), every ``stride`` px (default: side by side), each tile brought to
    ``img_size`` and classified as evaluation classifies a chip (:func:`classify_images`), one
    output pixel per tile.

    ``<stem>_pred.tif``: the class of each tile (uint8, with a colour table and each value's
    class name; multi-label: one 0/1 band per label), 255 where a tile has no valid pixel;
    ``<stem>_prob.tif`` with ``probabilities``: float32, one band per class. Georeferenced: an
    output pixel covers its tile's first ``stride`` x ``stride`` pixels (the scene's transform,
    scaled by the stride). A tile reaching past the scene's edge is padded with NaN (invalid
    pixels). Memory: one row of tiles at a time.
    """
    task, spec, src, path = predictor.task, predictor.spec, scene.src, scene.path
    th, tw = predictor.tile or (predictor.window, predictor.window)
    sy, sx = (th, tw) if predictor.stride is None else (predictor.stride, predictor.stride)
    rows, cols = math.ceil(src.height / sy), math.ceil(src.width / sx)
    multi = bool(getattr(task, "multi_label", False))
    classes = np.full((spec.num_classes if multi else 1, rows, cols), NODATA_CLASS, np.uint8)
    probs = np.full((spec.num_classes, rows, cols), np.nan, np.float32)
    profile = {**scene.profile(1, "uint8", NODATA_CLASS), "height": rows, "width": cols,
               "tiled": False}  # fmt: skip
    profile.pop("blockxsize"), profile.pop("blockysize")
    if "transform" in profile or src.crs is not None:
        profile["transform"] = src.transform @ Affine.scale(sx, sy)
    forwards = 0
    warned: set[str] = set()
    bar = tqdm(range(rows), desc=path.name, disable=not progress, leave=False, dynamic_ncols=True)
    for r in bar:
        top = r * sy
        height = min(th, src.height - top)
        strip = scene.read(Window(0, top, src.width, height))  # (C, height, W)
        strip = torch.from_numpy(strip)
        pad_w = max(0, (cols - 1) * sx + tw - src.width)
        strip = torch.nn.functional.pad(strip, (0, pad_w, 0, th - height), value=torch.nan)
        tiles = [strip[:, :, c * sx : c * sx + tw] for c in range(cols)]
        valid = [c for c, tile in enumerate(tiles) if not torch.isnan(tile).all()]
        p, decided = classify_images(predictor, [tiles[c] for c in valid], scene.batch_size,
                                     warned)  # fmt: skip
        forwards += len(valid)
        probs[:, r, valid] = p.T
        classes[:, r, valid] = decided.T if multi else decided[None]
    out_dir = Path(out_dir)
    pred_path = out_dir / f"{path.stem}_pred.tif"
    with (
        atomic_path(pred_path) as tmp,
        rasterio.open(tmp, "w", **{**profile, "count": classes.shape[0]}) as dst,
    ):
        if multi:
            describe_labels(dst, spec.classes)
        else:  # before the pixels: GDAL sets a palette only then
            describe_classes(dst, spec.classes)
        dst.write(classes)
        dst.update_tags(run=str(predictor.run_dir or ""), tile=f"{th}x{tw}",
                        stride=f"{sy}x{sx}")  # fmt: skip
    prob_path = None
    if probabilities:
        prob_path = out_dir / f"{path.stem}_prob.tif"
        prob_profile = {**profile, "count": spec.num_classes, "dtype": "float32",
                        "nodata": np.nan}  # fmt: skip
        with atomic_path(prob_path) as tmp, rasterio.open(tmp, "w", **prob_profile) as dst:
            dst.write(probs)
            for k, name in enumerate(spec.classes):
                dst.set_band_description(k + 1, name)
    log.info("%s: %d x %d tiles of %d x %d px every %d x %d px -> %s", path.name, rows, cols,
             th, tw, sy, sx, pred_path)  # fmt: skip
    return pred_path, prob_path, forwards


def chip_rows(
    predictor, paths: Sequence[Path], images: Sequence[torch.Tensor], batch_size: int = 8
) -> list[list[str]]:
    """Each chip of ``paths`` (read whole into ``images``: trained units, NaN where invalid)
    classified as evaluation classifies a test image (:func:`classify_images`): its rows of
    :data:`CHIP_TABLE` (without the header); a chip without a valid pixel has no class."""
    spec, multi = predictor.spec, bool(getattr(predictor.task, "multi_label", False))
    empty = {i for i, image in enumerate(images) if torch.isnan(image).all()}
    if empty:
        log.warning("%d chip(s) have no valid pixel in any band, so no class: %s", len(empty),
                    ", ".join(paths[i].name for i in sorted(empty)[:5]))  # fmt: skip
    keep = [i for i in range(len(images)) if i not in empty]
    p, decided = classify_images(predictor, [images[i] for i in keep], batch_size)
    rows: list[list[str]] = []
    by_index = {i: j for j, i in enumerate(keep)}
    for i, path in enumerate(paths):
        if i not in by_index:
            rows.append([path.name, "", *([""] * (spec.num_classes * (2 if multi else 1)))])
            continue
        j = by_index[i]
        probabilities = [f"{v:.6f}" for v in p[j]]
        if multi:
            hot = [str(int(v)) for v in decided[j]]
            names = ";".join(c for c, v in zip(spec.classes, decided[j]) if v)
            rows.append([path.name, names, *hot, *probabilities])
        else:
            rows.append([path.name, spec.classes[int(decided[j])], *probabilities])
    return rows


def write_chip_table(predictor, rows: list[list[str]], out_dir: Path) -> Path:
    """Write :data:`CHIP_TABLE`: ``chip`` (the file name), ``prediction`` (the class, or the
    ``;``-joined labels), for a multi-label run one 0/1 column per label, then ``p_<class>``
    per class, as evaluation's ``predictions.csv``; empty cells for a chip without a valid
    pixel. Written atomically."""
    spec = predictor.spec
    multi = bool(getattr(predictor.task, "multi_label", False))
    header = ["chip", "prediction", *(spec.classes if multi else ()),
              *(f"p_{c}" for c in spec.classes)]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path = Path(out_dir) / CHIP_TABLE
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())
    return path


def split_chips(
    predictor, paths: Sequence[Path], chips: bool | None
) -> tuple[list[Path], list[Path]]:
    """``(chips, scenes)`` of ``paths`` for a classification run. ``chips=True``: every file is
    a chip; ``False``: every file is a scene; None: a file no larger than the training chips
    (``predictor.tile``) in both sides is a chip, a larger one a scene."""
    if chips is not None:
        return (list(paths), []) if chips else ([], list(paths))
    th, tw = predictor.tile or (predictor.window, predictor.window)
    small, large = [], []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    size = (src.height, src.width)
        except RasterioError as err:
            raise OSError(f"cannot open {str(path)!r} (not a GeoTIFF?): {err}") from err
        (small if size[0] <= th and size[1] <= tw else large).append(path)
    if small:
        log.info("%d file(s) no larger than the training chips (%d x %d px): classified as "
                 "chips into %s (--scenes maps them as scenes)", len(small), th, tw, CHIP_TABLE)  # fmt: skip
    if large:
        log.info("%d file(s) larger than the training chips (%d x %d px): mapped as scenes, one "
                 "pixel per tile (--chips classifies each whole)", len(large), th, tw)  # fmt: skip
    return small, large


class ClassificationScenes:
    """What ``scripts/predict.py`` writes for a classification run: a file no larger than the
    training chips is a chip (a row of :data:`CHIP_TABLE`), a larger one a scene (one output
    pixel per tile of the chips' size)."""

    def prepare(self, run_dir: Path, spec: DataSpec, window: int, source: str) -> tuple[int, int]:
        """Check the manifest's classes; the tile a scene is cut into: the training chips'
        size (:func:`recorded_chip_size`)."""
        check_classes(spec, source)
        return recorded_chip_size(run_dir, window)

    def split(self, predictor, paths: list[Path], chips: bool | None) -> tuple[list, list]:
        """``(chips, scenes)`` of ``paths`` (:func:`split_chips`)."""
        return split_chips(predictor, paths, chips)

    def write_scene(self, predictor, scene, out_dir: Path, probabilities: bool,
                    progress: bool) -> tuple[Path, Path | None, int]:  # fmt: skip
        """One pixel per tile of the scene (:func:`classify_tiles`)."""
        return classify_tiles(predictor, scene, out_dir, probabilities, progress)

    def chip_rows(self, predictor, paths: Sequence[Path], images: Sequence[torch.Tensor],
                  batch_size: int) -> list[list[str]]:  # fmt: skip
        """The table rows of chips read whole (:func:`chip_rows`)."""
        return chip_rows(predictor, paths, images, batch_size)

    def write_chip_table(self, predictor, rows: list[list[str]], out_dir: Path) -> Path:
        """:data:`CHIP_TABLE` in ``out_dir`` (:func:`write_chip_table`)."""
        return write_chip_table(predictor, rows, out_dir)
