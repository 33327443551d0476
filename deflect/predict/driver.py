"""The driver of scene prediction: every scene of the inputs opened, checked and handed to the
run's task, which writes what it predicts (its ``scene_writer``); files that the task takes as
chips read and classified into one table; scenes shared among torchrun's ranks."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from deflect import rasters
from deflect.predict.blocks import DEFAULT_BLOCK, SceneSource
from deflect.predict.listing import list_scenes
from deflect.predict.reading import band_medians, check_reflectance_scale, open_scene, read_valid
from deflect.predict.run import Predictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SceneOutputs:
    """What :func:`predict_scene` wrote.

    Args:
        prediction: the prediction GeoTIFF (a class map), or the chip table
            (``predictions.csv``).
        probabilities: the float32 per-class probabilities GeoTIFF, or None.
        forwards: tiles (or chips) run through the model (tiles straddling blocks count once
            per block).
    """

    prediction: Path
    probabilities: Path | None
    forwards: int


def predict_scene(
    predictor: Predictor,
    path: str | Path,
    out_dir: str | Path,
    batch_size: int = 8,
    block: int = DEFAULT_BLOCK,
    probabilities: bool = False,
    bands: Sequence[str] | None = None,
    progress: bool = True,
    sensor: str | None = None,
    reflectance_scale: float | None = None,
) -> SceneOutputs:
    """Predict one GeoTIFF scene of any size into ``out_dir``: the scene opened with its bands
    matched to the model's, its reflectance scale checked, then written by the run's task.

    A segmentation run writes ``<stem>_pred.tif`` (uint8 class indices, 255 where every band is
    invalid, with a colour table and each value's class name) and, with ``probabilities``,
    ``<stem>_prob.tif`` (float32 softmax, one band per class named after it, NaN where every
    band is invalid), made block by block (:meth:`~deflect.predict.blocks.SceneSource.
    dense_blocks`); both tiled, deflate-compressed, with the scene's CRS and transform, written
    atomically (a failure leaves no partial file). A classification run writes one pixel per
    tile instead (:func:`deflect.tasks.classification.scenes.classify_tiles`).

    Args:
        predictor: from :func:`~deflect.predict.run.load_predictor`.
        path: the scene.
        out_dir: the output folder (created if needed).
        batch_size: tiles per forward pass.
        block: side of the output blocks in pixels, rounded down to a multiple of the stride;
            memory grows with its square, never with the scene.
        probabilities: also write the class probabilities.
        bands: the scene's band names in file order (default: its band descriptions).
        progress: show a progress bar.
        sensor: the scene's sensor when it is not the model's (its bands are then mapped to the
            trained ones by spyndex band and wavelength).
        reflectance_scale: the scene's stored value of reflectance 1.0 when it differs from
            training's (its reflectance bands are converted).

    Returns:
        The written paths.

    Raises:
        FileNotFoundError: the scene does not exist.
        OSError: it cannot be read.
        ValueError: it lacks bands the model needs, or a bad ``batch_size`` or ``block``.
    """
    path = Path(path).expanduser()
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    spec = predictor.spec
    out_dir = Path(out_dir).expanduser()
    scene = open_scene(predictor, path, bands, sensor, reflectance_scale)
    with scene.src as src:
        medians = band_medians(src, scene.indexes, spec, nodata=scene.nodata)  # file units
        check_reflectance_scale(medians, spec, f"scene {str(path)!r}", reflectance_scale)
        source = SceneSource(predictor, path, scene, batch_size, block)
        written = predictor.task.scene_writer().write_scene(predictor, source, out_dir,
                                                            probabilities, progress)  # fmt: skip
    return SceneOutputs(*written)


def read_chips(
    predictor: Predictor,
    paths: Sequence[Path],
    bands: Sequence[str] | None = None,
    progress: bool = True,
    sensor: str | None = None,
    reflectance_scale: float | None = None,
) -> list[torch.Tensor]:
    """Each file of ``paths`` read whole as one chip, in the trained units with invalid pixels
    NaN (all NaN for a chip without a valid pixel); the reflectance scale checked on the first
    chip with valid pixels (one warning for a folder of chips, not one per chip)."""
    spec = predictor.spec
    images = []
    warned_scale = False
    for path in tqdm(paths, desc="chips", disable=not progress, leave=False, dynamic_ncols=True):
        scene = open_scene(predictor, path, bands, sensor, reflectance_scale, what="chip")
        with scene.src as src:
            image = read_valid(src, scene.indexes, None, spec, scene.nodata)  # file units
        if not np.isnan(image).all() and not warned_scale:
            medians = rasters.band_medians([image], spec.bands)
            warned_scale = check_reflectance_scale(medians, spec, f"chip {str(path)!r}",
                                                   reflectance_scale)  # fmt: skip
        if scene.factors is not None:  # to the trained reflectance scale, as read_valid does
            image = image * scene.factors
        images.append(torch.from_numpy(image))
    return images


def predict_scenes(
    predictor: Predictor,
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    batch_size: int = 8,
    block: int = DEFAULT_BLOCK,
    probabilities: bool = False,
    bands: Sequence[str] | None = None,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    pattern: str | None = None,
    sensor: str | None = None,
    reflectance_scale: float | None = None,
    chips: bool | None = None,
) -> list[SceneOutputs]:
    """Predict every scene of ``inputs`` (files or folders of .tif/.tiff) into ``out_dir``.

    The run's task says which files are chips and which scenes (its scene writer's ``split``;
    a classification run: by size, :func:`deflect.tasks.classification.scenes.split_chips`):
    the chips are read (:func:`read_chips`) and go into one table,
    ``<out_dir>/predictions.csv``, the scenes each into their own outputs
    (:func:`predict_scene`).

    Under torchrun (a ``torch.distributed`` process group), rank ``r`` of ``world`` predicts
    scenes ``r, r + world, ...`` (and chips likewise; rank 0 writes their table).

    Args:
        predictor: from :func:`~deflect.predict.run.load_predictor`.
        inputs: scene files or folders.
        out_dir: the output folder.
        batch_size, block, probabilities, bands, progress: as :func:`predict_scene`.
        rank, world_size: this process's share; default from ``torch.distributed`` (0 and 1
            without a process group).
        pattern: file names taken from folders (:func:`~deflect.predict.listing.list_scenes`);
            None: the images of a folder in the run's training layout, else every GeoTIFF.
        sensor, reflectance_scale: as :func:`predict_scene`.
        chips: runs whose task takes chips (classification): True, every file is a chip;
            False, every file is a scene; None, by size.

    Returns:
        What this process wrote (the chip table as one entry, on rank 0).

    Raises:
        FileNotFoundError, ValueError: as :func:`~deflect.predict.listing.list_scenes` and
            :func:`predict_scene`, and ``chips`` given for a run whose task takes no chips.
    """
    scenes = list_scenes(inputs, pattern, predictor.file_patterns)
    if rank is None or world_size is None:
        dist = torch.distributed
        grouped = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if grouped else 0
        world_size = dist.get_world_size() if grouped else 1
    writer = predictor.task.scene_writer()
    chip_files, scenes = writer.split(predictor, scenes, chips)
    mine = scenes[rank::world_size]
    if scenes:
        log.info("%d scenes (%d on this process) -> %s", len(scenes), len(mine), out_dir)
    outputs = [
        predict_scene(
            predictor,
            scene,
            out_dir,
            batch_size,
            block,
            probabilities,
            bands,
            progress,
            sensor,
            reflectance_scale,
        )  # fmt: skip
        for scene in mine
    ]
    if chip_files:
        my_chips = chip_files[rank::world_size]
        images = read_chips(predictor, my_chips, bands, progress, sensor, reflectance_scale)
        rows = writer.chip_rows(predictor, my_chips, images, batch_size)
        dist = torch.distributed
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, rows)
            # Rank r holds files r, r + world, ...: put them back in the listing's order.
            rows = [row for group in zip(*gathered) for row in group] + [
                row for part in gathered for row in part[min(map(len, gathered)) :]
            ]
        if rank == 0:
            table = writer.write_chip_table(predictor, rows, Path(out_dir).expanduser())
            log.info("%d chips -> %s", len(rows), table)
            outputs.append(SceneOutputs(table, None, len(rows)))
    return outputs
