"""Whole-scene prediction in bounded memory: a trained run folder over GeoTIFF scenes of any size.

    from deflect.engine.predict import load_predictor, predict_scenes
    predictor = load_predictor("work_dirs/<run>", device="cuda")
    predict_scenes(predictor, ["scenes/"], "predictions/", probabilities=True)

The result equals evaluation's sliding window (:func:`~deflect.engine.inference.
sliding_window_logits`) run over the whole scene at once, pixel for pixel: the same global grid of
``window`` x ``window`` tiles (:func:`~deflect.engine.inference.window_starts` over the full
height and width, the last tile flush with the edge, NaN padding for scenes smaller than the
window), logits summed over the tiles covering a pixel and divided by their count.

Neither the scene nor its logits are ever held whole. The output is made in square blocks of
``block`` pixels (a multiple of the stride); for each block, only the tiles of the global grid
that intersect it are read (one windowed read of their union), run in batches, and averaged in a
buffer the size of the block, which is then written (class map, optionally probabilities) into a
tiled GeoTIFF. Tiles straddling two blocks are computed once for each: memory stays bounded by
the block, never by the scene.

Inputs are prepared as the data pipeline prepares training samples (``datasets/base.py``
``read_sample`` and ``datasets/transforms.py`` ``JointTransform``): bands picked by name in the
model's order, non-finite pixels and the training no-data value become NaN, then
``(x - mean) / std`` per band with the run's statistics.

A classification run follows evaluation's rule for a test image instead (:func:`classify_images`):
a scene is cut into tiles of the training chips' size (the run's ``input.json``), each brought
to ``img_size`` by the run's evaluation transform, one output pixel per tile
(:func:`classify_tiles`); files no larger than a chip are classified whole into one table,
``predictions.csv`` (:func:`chip_rows`, :func:`split_chips`).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine
from omegaconf import DictConfig
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window
from torch import nn
from tqdm import tqdm

from deflect.data import (
    DataSpec,
    canonical_band,
    invalid_to_nan,
    map_bands,
    reflectance_bands,
    resolve_band_name,
)
from deflect.engine.distributed import resolve_device
from deflect.engine.evaluator import AUTOCAST_DTYPES, autocast_context
from deflect.engine.inference import window_starts
from deflect.engine.outputs import NODATA_CLASS, describe_classes, describe_labels
from deflect.io import atomic_path
from deflect.tasks import InferenceSettings

log = logging.getLogger(__name__)

#: Default side of the output blocks, in pixels (rounded to a multiple of the stride).
DEFAULT_BLOCK = 1024
#: Side of the output GeoTIFFs' internal tiles.
OUTPUT_TILE = 256
#: The reflectance-scale check reads the scene decimated to at most this many pixels a side.
SCALE_CHECK_SIZE = 512
#: Scene medians further than this factor from the training means look like another scale.
SCALE_CHECK_FACTOR = 20.0
#: File suffixes of scenes.
SCENE_SUFFIXES = (".tif", ".tiff")
#: Name endings of this module's own outputs, skipped when a folder is listed.
OUTPUT_ENDINGS = ("_pred.tif", "_prob.tif")


@dataclass(frozen=True)
class Predictor:
    """A trained model and what is needed to run it over scenes.

    Args:
        model: the segmentor, in eval mode, on ``device``.
        spec: the band manifest it was trained on (bands, statistics, no-data, classes).
        window: the encoder input size (the run's ``img_size``).
        stride: the sliding-window stride; for a classification run the step between tiles,
            None for tiles side by side.
        device: where the model runs.
        precision: autocast precision, ``fp32``, ``bf16`` or ``fp16``.
        run_dir: the run folder it came from.
        epoch: the epoch (1-based) of ``checkpoints/best.pt``, when recorded.
        file_patterns: file names of the run's training images and masks
            (:func:`file_patterns`): how folders are listed by default.
        task: the run's task (segmentation when None; a classification run maps one pixel
            per tile of the scene).
        tile: a classification run's tile ``(height, width)``: the size of its training images
            (``input.json``), the ground footprint the model learnt from. Each tile is brought
            to ``window`` as evaluation brings a test image (:func:`classify_images`).
        raw_input: the model takes raw tiles (no-data as NaN, not normalised): an exported
            ONNX file, which normalises inside (:mod:`deflect.export.runtime`).
    """

    model: nn.Module
    spec: DataSpec
    window: int
    stride: int | None
    device: torch.device
    precision: str = "fp32"
    run_dir: Path | None = None
    epoch: int | None = None
    file_patterns: tuple[str | None, str | None] = (None, None)
    task: object | None = None
    tile: tuple[int, int] | None = None

    @property
    def classifies(self) -> bool:
        """Whether the run classifies images (one class per tile or chip)."""
        return getattr(self.task, "name", "segmentation") == "classification"

    raw_input: bool = False


def file_patterns(cfg: DictConfig) -> tuple[str | None, str | None]:
    """The file-name patterns of the run's training images and masks (``*_image.tif`` and
    ``*_mask.tif`` for the default folder layout), so that a folder in the training layout is
    predicted without its masks; None where the dataset names no files by a pattern."""
    dataset = cfg.get("dataset") or {}
    out = []
    for key, attr in (("images", "image_suffix"), ("masks", "mask_suffix")):
        pattern = dataset.get(key)
        if isinstance(pattern, str) and pattern:
            name = Path(pattern).name.replace("{name}", "*").replace("{split}", "*")
            out.append(name if name != "*" else None)
            continue
        target = str(dataset.get("_target_", ""))
        suffix = None
        if target.startswith("datasets."):
            import datasets

            cls = getattr(datasets, target.split(".", 1)[1], None)
            suffix = getattr(cls, attr, None)
        out.append(f"*{suffix}" if isinstance(suffix, str) else None)
    return out[0], out[1]


@dataclass(frozen=True)
class SceneOutputs:
    """What :func:`predict_scene` wrote.

    Args:
        prediction: the uint8 class map GeoTIFF (or the chip table, ``predictions.csv``).
        probabilities: the float32 per-class softmax GeoTIFF, or None.
        forwards: tiles (or chips) run through the model (tiles straddling blocks count once
            per block).
    """

    prediction: Path
    probabilities: Path | None
    forwards: int


# ------------------------------------------------------------------------------------ the run


def resolve_run_dir(path: str | Path) -> Path:
    """The run folder of ``path``: the folder itself, or the run above an ``adapter/`` export.

    Args:
        path: a run folder (``work_dirs/<time>_<encoder>_<finetune>_<dataset>``) or its
            ``adapter/`` (or ``adapter/<name>/``) subfolder.

    Returns:
        The folder holding ``config.yaml``.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a run folder.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"run folder {str(path)!r} does not exist; pass a folder written by training, e.g. "
            "work_dirs/<time>_<encoder>_<finetune>_<dataset>"
        )
    candidates = [path]
    if path.name == "adapter":
        candidates.append(path.parent)
    elif path.parent.name == "adapter":
        candidates.append(path.parent.parent)
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            if candidate != path:
                log.info("%s is the adapter export of run %s: using that run", path, candidate)
            return candidate
    raise FileNotFoundError(
        f"{str(path)!r} is not a run folder (no config.yaml); pass a folder written by "
        "training, e.g. work_dirs/<time>_<encoder>_<finetune>_<dataset>"
    )


def default_stride(cfg: DictConfig, window: int) -> int:
    """The evaluation stride of a run: ``cfg.eval_stride`` when set, else half the window."""
    stride = cfg.get("eval_stride")
    return InferenceSettings(window=window, stride=int(stride) if stride else None).step


def load_predictor(
    run_dir: str | Path,
    device: str | torch.device = "auto",
    precision: str | None = None,
    stride: int | None = None,
) -> Predictor:
    """Build a run's model from its ``config.yaml`` and load ``checkpoints/best.pt``.

    The band manifest (bands, statistics, no-data value, classes) comes from the checkpoint, so
    the dataset need not be on this machine.

    Args:
        run_dir: the run folder (or its ``adapter/`` subfolder).
        device: ``auto``, ``cpu``, ``cuda`` or a ``torch.device``.
        precision: autocast precision; None uses the run's ``precision``.
        stride: sliding-window stride; None uses the run's evaluation stride (``eval_stride``,
            else half the window).

    Returns:
        The model in eval mode on ``device`` with its window, stride and data description.

    Raises:
        FileNotFoundError: not a run folder, or the run has no ``checkpoints/best.pt``.
        ValueError: a bad precision or stride, or a checkpoint without a band manifest.
    """
    from deflect.engine.build import build_model
    from deflect.engine.checkpoint import load_checkpoint, load_model_state
    from deflect.engine.runtime import apply_runtime
    from deflect.engine.workdir import best_checkpoint, eval_config

    run_dir = resolve_run_dir(run_dir)
    best = best_checkpoint(run_dir)
    cfg = eval_config(run_dir, [])
    apply_runtime(cfg)  # the run's matmul precision and CPU allocator
    precision = str(precision or cfg.get("precision") or "fp32")
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision={precision!r} is not one of {list(AUTOCAST_DTYPES)}")
    from deflect.engine.build import build_task

    task = build_task(cfg)
    window = int(cfg.img_size)
    tile = recorded_chip_size(run_dir, window) if task.name == "classification" else None
    if stride is None and tile is None:
        stride = default_stride(cfg, window)
    if stride is not None:  # a classification run's default: tiles side by side
        stride = int(stride)
        largest = min(tile) if tile else window
        if not 1 <= stride <= largest:
            what = "tile, the training chips' size" if tile else "window, the run's img_size"
            raise ValueError(
                f"stride={stride} must be between 1 and the {what} ({largest} px); a larger "
                "stride leaves pixels no tile covers"
            )
    state = load_checkpoint(best)
    if not state.get("data"):
        raise ValueError(
            f"checkpoint {best} has no band manifest ('data'), so its bands and statistics are "
            "unknown; it was written by an older version: retrain the run"
        )
    spec = DataSpec.from_dict(json.loads(state["data"]))
    if not spec.classes:
        raise ValueError(f"the band manifest of {best} has no classes; it is not a trained model")
    if spec.num_classes > NODATA_CLASS:
        raise ValueError(
            f"the run has {spec.num_classes} classes but the class map is uint8 with "
            f"{NODATA_CLASS} for no data; at most {NODATA_CLASS} classes can be written"
        )
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weights warnings: the checkpoint replaces them
        model = build_model(cfg, spec)
    load_model_state(model, state, str(best))
    model = model.to(dev).eval()
    epoch = int(state["epoch"]) + 1 if "epoch" in state else None
    log.info(
        "model of %s (best epoch %s): bands %s, %d classes, window %d, %s, %s on %s",
        run_dir.name, epoch, list(spec.bands), spec.num_classes, window,
        f"tiles of {tile[0]} x {tile[1]} px (the training chips) brought to {window} px"
        if tile else f"stride {stride}", precision, dev,
    )  # fmt: skip
    return Predictor(
        model, spec, window, stride, dev, precision, run_dir, epoch, file_patterns(cfg), task, tile
    )


def recorded_chip_size(run_dir: Path, window: int) -> tuple[int, int]:
    """The size of a classification run's training images, from its ``input.json``; a run
    written before that record existed falls back to ``window`` (its ``img_size``), with a
    warning."""
    from deflect.tasks.classification import INPUT_RECORD

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


# ---------------------------------------------------------------------------------- the scene


def select_bands(
    count: int,
    descriptions: Sequence[str | None],
    spec: DataSpec,
    bands: Sequence[str] | None = None,
    source: str = "the scene",
    sensor: str | None = None,
) -> list[int]:
    """The scene's band numbers (1-based) holding the model's bands, in the model's order.

    With ``sensor`` other than the model's (a Landsat 8 scene for a Sentinel-2 model), the
    scene's bands are read as that sensor's and mapped to the trained ones by spyndex band and
    wavelength (:func:`~deflect.data.map_bands`); the mapping is logged.

    The scene's band names are ``bands`` when given, else its band descriptions when every band
    has one, else (a scene of exactly as many bands as the model takes) the training order,
    with a warning.

    Args:
        count: number of bands of the scene.
        descriptions: the scene's band descriptions (``src.descriptions``; None where unset).
        spec: the model's data description.
        bands: the scene's band names in file order, overriding the descriptions.
        source: the scene, for messages.

    Returns:
        1-based band indexes, one per band of ``spec.bands``.

    Raises:
        ValueError: ``bands`` of the wrong length, unnamed bands of another count than the
            model's, or model bands missing from the scene.
    """
    model_bands = list(spec.bands)
    if bands is not None:
        names = [str(b) for b in bands]
        if len(names) != count:
            raise ValueError(
                f"--bands names {len(names)} bands ({names}) but {source} has {count}; name "
                "every band of the file, in file order"
            )
    elif count and all(d for d in descriptions):
        names = [str(d) for d in descriptions]
    elif count == len(model_bands):
        log.warning(
            "%s has no band names (descriptions); assuming the training order %s. If that is "
            "wrong, give the file's order with --bands",
            source,
            ",".join(model_bands),
        )
        names = model_bands
    else:
        raise ValueError(
            f"{source} has {count} bands without names (descriptions) and the model takes "
            f"{len(model_bands)} ({model_bands}); give the file's band names in order with "
            "--bands B2,B3,..."
        )
    if sensor and sensor != spec.sensor:
        given = [resolve_band_name(n, sensor) or canonical_band(n) for n in names]
        mapping = map_bands(spec.bands, spec.sensor, given, sensor)
        log.info("%s: %s bands mapped to the trained %s bands: %s", source, sensor, spec.sensor,
                 ", ".join(f"{t} <- {g}" for t, g, _, _ in mapping))  # fmt: skip
        return [given.index(g) + 1 for _, g, _, _ in mapping]
    # Codes, common names (Blue, NIR, SWIR 1) or wavelengths, for the model's sensor.
    canon = [resolve_band_name(n, spec.sensor) or canonical_band(n) for n in names]
    renamed = [f"{n} -> {c}" for n, c in zip(names, canon) if canonical_band(n) != c]
    if renamed:
        log.info("%s: band names read as %s", source, ", ".join(renamed))
    missing = [b for b in model_bands if canonical_band(b) not in canon]
    if missing:
        raise ValueError(
            f"{source} lacks bands {missing} that the model needs: the scene has {names}, the "
            f"model takes {model_bands}. Use a scene with those bands (or, if its band names "
            "are wrong, give the right ones with --bands)"
        )
    return [canon.index(canonical_band(b)) + 1 for b in model_bands]


def read_valid(
    src: rasterio.DatasetReader,
    indexes: list[int],
    window: Window | None,
    spec: DataSpec,
    nodata: Sequence[float] = (),
    factors: np.ndarray | None = None,
) -> np.ndarray:
    """Bands ``indexes`` of ``window`` of ``src`` in the trained units, invalid pixels NaN: what
    a dataset's ``read_sample`` gives training and evaluation.

    Args:
        src: the open scene.
        indexes: 1-based band numbers, in the model's band order.
        window: the pixels to read (inside the scene); None for all of them.
        spec: the model's data description (its no-data value).
        nodata: no-data values besides the training one (the scene's own declared value).
        factors: ``(C, 1, 1)`` per-band factors to the trained units (another reflectance scale).

    Returns:
        float32 ``(C, height, width)``, NaN at invalid pixels.

    Raises:
        OSError: the pixels cannot be read.
    """
    try:
        raw = src.read(indexes, window=window)
    except RasterioError as err:
        where = f"pixels {window} of " if window is not None else "pixels of "
        raise OSError(f"cannot read {where}{src.name!r} (truncated or corrupt?): {err}") from err
    image = invalid_to_nan(raw, [v for v in (spec.nodata, *nodata) if v is not None])
    if factors is not None:  # another reflectance scale than training's
        image = image * factors
    return image


def read_normalised(
    src: rasterio.DatasetReader,
    indexes: list[int],
    window: Window,
    spec: DataSpec,
    nodata: Sequence[float] = (),
    factors: np.ndarray | None = None,
    normalise: bool = True,
) -> np.ndarray:
    """:func:`read_valid`, normalised per band: ``(x - mean) / std`` with the run's statistics,
    as the segmentation pipeline normalises (``datasets/transforms.py`` ``JointTransform``).
    ``normalise=False`` leaves the values in the trained units, for a model that normalises
    inside (an exported ONNX file, :mod:`deflect.export.runtime`)."""
    image = read_valid(src, indexes, window, spec, nodata, factors)
    if not normalise:
        return image
    mean = np.asarray(spec.mean_list(), dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std_list(), dtype=np.float32)[:, None, None]
    return (image - mean) / std


def band_medians(
    src: rasterio.DatasetReader,
    indexes: list[int],
    spec: DataSpec,
    size: int | None = None,
    nodata: Sequence[float] = (),
) -> list[float]:
    """Median of the valid pixels of each band, from the scene decimated to ``size`` a side.

    Args:
        src: the open scene.
        indexes: 1-based band numbers, in the model's band order.
        spec: the model's data description (its no-data value).
        size: at most this many pixels a side are read (default :data:`SCALE_CHECK_SIZE`).

    Returns:
        One median per band, in file units (NaN for a band without valid pixels).
    """
    size = SCALE_CHECK_SIZE if size is None else size
    step = max(1, math.ceil(max(src.height, src.width) / size))
    shape = (len(indexes), max(1, src.height // step), max(1, src.width // step))
    try:
        raw = src.read(indexes, out_shape=shape, resampling=Resampling.nearest)
    except RasterioError as err:
        raise OSError(
            f"cannot read pixels of {src.name!r} (truncated or corrupt?): {err}; re-download "
            "or re-export this scene"
        ) from err
    image = invalid_to_nan(raw, [v for v in (spec.nodata, *nodata) if v is not None])
    out = []
    for band in image:
        valid = band[np.isfinite(band)]
        out.append(float(np.median(valid)) if valid.size else float("nan"))
    return out


def check_reflectance_scale(medians: Sequence[float], spec: DataSpec, source: str) -> bool:
    """Warn when the scene's values look like another reflectance scale than training's.

    A band is off when its median and its training mean (both positive) differ by more than
    :data:`SCALE_CHECK_FACTOR`; the warning is given when most bands are off, e.g. a scene of
    integer reflectance x10000 for a model trained on float reflectance.

    Args:
        medians: the scene's median per band, in the model's band order.
        spec: the model's data description (band means, ``reflectance_scale``).
        source: the scene, for the message.

    Returns:
        True when it warned.
    """
    means = spec.mean_list()
    usable = [
        (b, m, mean)
        for b, m, mean in zip(spec.bands, medians, means)
        if math.isfinite(m) and m > 0 and mean > 0
    ]
    off = [(b, m, mean) for b, m, mean in usable if max(m / mean, mean / m) > SCALE_CHECK_FACTOR]
    if not off or len(off) * 2 <= len(usable):
        return False
    ratio = float(np.median([m / mean for _, m, mean in off]))
    warnings.warn(
        f"{source} looks like another reflectance scale than the model was trained on: bands "
        f"{[b for b, _, _ in off]} have scene medians {[round(m, 4) for _, m, _ in off]} but "
        f"training means {[round(mean, 4) for _, _, mean in off]} (about x{ratio:.3g}); the "
        f"model expects reflectance_scale={spec.reflectance_scale:g} (the stored value of "
        "reflectance 1.0). Rescale the scene to the training units, or predictions will be "
        "meaningless",
        UserWarning,
        stacklevel=2,
    )
    return True


def list_scenes(
    inputs: Iterable[str | Path],
    pattern: str | None = None,
    layout: tuple[str | None, str | None] = (None, None),
) -> list[Path]:
    """The GeoTIFF scenes named by ``inputs``: files, and the .tif/.tiff files of folders.

    Files of a folder that end in ``_pred.tif`` or ``_prob.tif`` (this module's outputs) are
    skipped. With ``pattern``, only the files whose name matches it are taken. Without it, a
    folder in the training layout ``layout = (image pattern, mask pattern)`` gives its images
    (its masks are left out); any other folder gives every GeoTIFF.

    Args:
        inputs: files or folders.
        pattern: a file-name pattern (``fnmatch``: ``*`` and ``?``) for the files of folders.
        layout: the run's training image and mask file-name patterns (:func:`file_patterns`).

    Returns:
        The scenes, folders' files sorted by name.

    Raises:
        FileNotFoundError: an input does not exist, or a folder holds no matching GeoTIFF.
        ValueError: no inputs, or two scenes with the same name (their outputs would collide).
    """
    images, masks = layout
    scenes: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.is_file()
                and p.suffix.lower() in SCENE_SUFFIXES
                and not p.name.endswith(OUTPUT_ENDINGS)
            )
            if pattern is not None:
                found = [p for p in found if fnmatch.fnmatch(p.name, pattern)]
            elif images and any(fnmatch.fnmatch(p.name, images) for p in found):
                found = [p for p in found if fnmatch.fnmatch(p.name, images)]
                log.info("%s is in the training layout: its %s files (masks left out)", path,
                         images)  # fmt: skip
            elif masks:
                found = [p for p in found if not fnmatch.fnmatch(p.name, masks)]
            if not found:
                which = f"matching --pattern {pattern!r}" if pattern else ".tif or .tiff"
                raise FileNotFoundError(
                    f"folder {str(path)!r} holds no {which} scene; pass GeoTIFF files or a "
                    "folder of them"
                )
            scenes.extend(found)
        elif path.is_file():
            scenes.append(path)
        else:
            raise FileNotFoundError(f"input {str(path)!r} does not exist; pass GeoTIFF files")
    if not scenes:
        raise ValueError("no input scenes; pass GeoTIFF files or folders of them")
    stems: dict[str, Path] = {}
    for scene in scenes:
        if scene.stem in stems:
            raise ValueError(
                f"scenes {str(stems[scene.stem])!r} and {str(scene)!r} have the same name, so "
                f"both would write {scene.stem}_pred.tif; predict them into separate --out folders"
            )
        stems[scene.stem] = scene
    return scenes


# ------------------------------------------------------------------------------------ blocks


def round_block(block: int, stride: int) -> int:
    """``block`` rounded down to a multiple of ``stride`` (at least one stride)."""
    if block < 1:
        raise ValueError(f"block={block} must be >= 1 pixel")
    return max(stride, block // stride * stride)


def coverage_counts(length: int, window: int, stride: int) -> np.ndarray:
    """How many tiles of the grid along one axis cover each of ``length`` pixels (float32).

    The grid is :func:`~deflect.engine.inference.window_starts` over ``max(length, window)``
    (a scene smaller than the window is padded to it). The count of 2-D tiles covering a pixel
    is the product of its row's and its column's counts.
    """
    counts = np.zeros(max(length, window), dtype=np.float32)
    for start in window_starts(max(length, window), window, stride):
        counts[start : start + window] += 1
    return counts[:length]


def intersecting(starts: Sequence[int], lo: int, hi: int, window: int) -> list[int]:
    """The tile starts of ``starts`` whose tile ``[start, start + window)`` meets ``[lo, hi)``."""
    return [s for s in starts if s < hi and s + window > lo]


def blocks(height: int, width: int, block: int) -> Iterator[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of the output blocks, row by row."""
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            yield y0, min(y0 + block, height), x0, min(x0 + block, width)


def _metadata(predictor: Predictor, batch: int, warned: set[str]) -> dict[str, torch.Tensor]:
    """The per-sample metadata the encoder takes that a scene can give: ``gsd`` only."""
    out = {}
    for key in getattr(predictor.model, "metadata_keys", ()):
        if key == "gsd":
            gsd = predictor.spec.gsd or 1.0
            out["gsd"] = torch.full((batch,), gsd, dtype=torch.float32, device=predictor.device)
        elif key not in warned:
            warned.add(key)
            log.warning(
                "the encoder takes %r, which needs per-sample metadata (dates, locations) a scene "
                "does not carry; predicting without it",
                key,
            )
    return out


class TileGrid:
    """The global tile grid of a scene, as :func:`~deflect.engine.inference.sliding_window_logits`
    lays it over the whole scene: tile starts and coverage counts along both axes.

    Args:
        height, width: the scene's size in pixels.
        window: the tile side.
        stride: the tile step.
    """

    def __init__(self, height: int, width: int, window: int, stride: int) -> None:
        self.height, self.width = height, width
        self.starts_y = window_starts(max(height, window), window, stride)
        self.starts_x = window_starts(max(width, window), window, stride)
        self.counts_y = coverage_counts(height, window, stride)
        self.counts_x = coverage_counts(width, window, stride)


@torch.no_grad()
def predict_block(
    predictor: Predictor,
    src: rasterio.DatasetReader,
    indexes: list[int],
    grid: TileGrid,
    box: tuple[int, int, int, int],
    batch_size: int,
    warned: set[str] | None = None,
    nodata: Sequence[float] = (),
    factors: np.ndarray | None = None,
) -> tuple[torch.Tensor, np.ndarray, int]:
    """Averaged logits of one output block from the global tiles that intersect it.

    Args:
        predictor: the model and its window.
        src: the open scene.
        indexes: the scene's band numbers in the model's order (:func:`select_bands`).
        grid: the scene's tile grid.
        box: the block ``(y0, y1, x0, x1)``.
        batch_size: tiles per forward pass.
        warned: metadata keys already warned about.
        nodata: no-data values besides the training one (the scene's own declared value).

    Returns:
        Logits ``(K, y1 - y0, x1 - x0)`` float32 on the CPU, the block's mask of pixels where
        every band is invalid ``(y1 - y0, x1 - x0)``, and the number of tiles run.
    """
    y0, y1, x0, x1 = box
    win = predictor.window
    tops = intersecting(grid.starts_y, y0, y1, win)
    lefts = intersecting(grid.starts_x, x0, x1, win)
    # The union of those tiles; beyond the scene (only for scenes smaller than the window) NaN.
    ey0, ey1, ex0, ex1 = tops[0], tops[-1] + win, lefts[0], lefts[-1] + win
    ry1, rx1 = min(ey1, grid.height), min(ex1, grid.width)
    read = read_normalised(
        src, indexes, Window(ex0, ey0, rx1 - ex0, ry1 - ey0), predictor.spec, nodata, factors,
        normalise=not predictor.raw_input,
    )  # fmt: skip
    image = torch.from_numpy(read)
    if ry1 < ey1 or rx1 < ex1:
        image = torch.nn.functional.pad(image, (0, ex1 - rx1, 0, ey1 - ry1), value=torch.nan)
    invalid = np.isnan(read[:, y0 - ey0 : y1 - ey0, x0 - ex0 : x1 - ex0]).all(axis=0)
    image = image.to(predictor.device)

    num_classes = predictor.spec.num_classes
    logits = torch.zeros((num_classes, y1 - y0, x1 - x0), dtype=torch.float32,
                         device=predictor.device)  # fmt: skip
    tiles = [(top, left) for top in tops for left in lefts]  # the order of sliding_window_logits
    warned = set() if warned is None else warned
    for first in range(0, len(tiles), batch_size):
        chunk = tiles[first : first + batch_size]
        batch = torch.stack(
            [image[:, t - ey0 : t - ey0 + win, le - ex0 : le - ex0 + win] for t, le in chunk]
        )
        with autocast_context(predictor.device, predictor.precision):
            out = predictor.model(batch, **_metadata(predictor, len(chunk), warned)).float()
        for (top, left), tile in zip(chunk, out):
            # The part of the tile inside the block (and inside the scene).
            a0, a1 = max(top, y0), min(top + win, y1)
            b0, b1 = max(left, x0), min(left + win, x1)
            logits[:, a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] += tile[
                :, a0 - top : a1 - top, b0 - left : b1 - left
            ]
    counts = np.outer(grid.counts_y[y0:y1], grid.counts_x[x0:x1])
    logits /= torch.from_numpy(counts).to(predictor.device)
    return logits.cpu(), invalid, len(tiles)


def _profile(src: rasterio.DatasetReader, count: int, dtype: str, nodata: float) -> dict:
    profile = {
        "driver": "GTiff",
        "height": src.height,
        "width": src.width,
        "count": count,
        "dtype": dtype,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": OUTPUT_TILE,
        "blockysize": OUTPUT_TILE,
        "compress": "deflate",
        "bigtiff": "IF_SAFER",
    }
    if src.crs is not None:
        profile["crs"] = src.crs
    if src.crs is not None or src.transform != Affine.identity():
        profile["transform"] = src.transform  # an identity without a CRS: no georeference
    return profile


@dataclass(frozen=True)
class SceneInput:
    """An open scene (or chip) and how its bands become the model's.

    Args:
        src: the open file.
        indexes: its band numbers (1-based) holding the model's bands, in the model's order.
        nodata: its own declared no-data value (besides the training one), or nothing.
        factors: ``(C, 1, 1)`` factors to the trained reflectance scale, or None.
    """

    src: rasterio.DatasetReader
    indexes: list[int]
    nodata: tuple[float, ...]
    factors: np.ndarray | None


def open_scene(
    predictor: Predictor,
    path: Path,
    bands: Sequence[str] | None = None,
    sensor: str | None = None,
    reflectance_scale: float | None = None,
    what: str = "scene",
) -> SceneInput:
    """Open a GeoTIFF and match its bands, no-data value and units to the model's
    (:func:`select_bands`); the caller closes ``src``.

    Raises:
        FileNotFoundError: the file does not exist.
        OSError: it cannot be opened.
        ValueError: it lacks bands the model needs.
    """
    spec = predictor.spec
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    except RasterioError as err:
        raise OSError(f"cannot open {what} {str(path)!r} (not a GeoTIFF?): {err}") from err
    try:
        indexes = select_bands(src.count, src.descriptions, spec, bands, f"{what} {str(path)!r}",
                               sensor)  # fmt: skip
    except BaseException:
        src.close()
        raise
    factors = None
    if reflectance_scale and float(reflectance_scale) != spec.reflectance_scale:
        optical = set(reflectance_bands(spec.bands, spec.sensor))
        factor = spec.reflectance_scale / float(reflectance_scale)
        factors = np.array([factor if b in optical else 1.0 for b in spec.bands],
                           dtype=np.float32)[:, None, None]  # fmt: skip
    # The file's own no-data value is honoured too, as training honours its files' value.
    nodata = () if src.nodata is None or np.isnan(src.nodata) else (float(src.nodata),)
    if nodata and spec.nodata != nodata[0] and what == "scene":
        log.info("%s declares no-data %g (training used %s): those pixels are left out",
                 path.name, nodata[0], spec.nodata)  # fmt: skip
    return SceneInput(src, indexes, nodata, factors)


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
    """Predict one GeoTIFF scene of any size, block by block, into ``out_dir``.

    Writes ``<stem>_pred.tif`` (uint8 class indices, :data:`NODATA_CLASS` where every band is
    invalid, with a colour table and each value's class name, :func:`~deflect.engine.outputs.
    describe_classes`) and, with ``probabilities``, ``<stem>_prob.tif`` (float32 softmax, one
    band per class named after it, NaN where every band is invalid); both tiled,
    deflate-compressed, with the scene's CRS and transform, written atomically (a failure
    leaves no partial file). A classification run writes one pixel per tile instead
    (:func:`classify_tiles`).

    Args:
        predictor: from :func:`load_predictor`.
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
    pred_path = out_dir / f"{path.stem}_pred.tif"
    prob_path = out_dir / f"{path.stem}_prob.tif" if probabilities else None
    scene = open_scene(predictor, path, bands, sensor, reflectance_scale)
    src, indexes, nodata, factors = scene.src, scene.indexes, scene.nodata, scene.factors
    with src, ExitStack() as stack:
        medians = band_medians(src, indexes, spec, nodata=nodata)
        if factors is not None:
            medians = [m * float(f) for m, f in zip(medians, factors.ravel())]
        check_reflectance_scale(medians, spec, f"scene {str(path)!r}")
        if predictor.classifies:
            return classify_tiles(predictor, scene, path, out_dir, batch_size, probabilities,
                                  progress)  # fmt: skip
        block = round_block(block, predictor.stride)
        grid = TileGrid(src.height, src.width, predictor.window, predictor.stride)
        tmp = stack.enter_context(atomic_path(pred_path))
        pred = stack.enter_context(
            rasterio.open(tmp, "w", **_profile(src, 1, "uint8", NODATA_CLASS))
        )
        describe_classes(pred, spec.classes)
        pred.update_tags(run=str(predictor.run_dir or ""))
        prob = None
        if prob_path is not None:
            tmp_prob = stack.enter_context(atomic_path(prob_path))
            prob = stack.enter_context(
                rasterio.open(tmp_prob, "w", **_profile(src, spec.num_classes, "float32", np.nan))
            )
            for k, name in enumerate(spec.classes):
                prob.set_band_description(k + 1, name)
            prob.update_tags(classes=",".join(spec.classes), run=str(predictor.run_dir or ""))
        boxes = list(blocks(src.height, src.width, block))
        warned: set[str] = set()
        forwards = 0
        bar = tqdm(boxes, desc=path.name, disable=not progress, leave=False, dynamic_ncols=True)
        for box in bar:
            logits, invalid, run = predict_block(
                predictor, src, indexes, grid, box, batch_size, warned, nodata, factors
            )
            forwards += run
            y0, y1, x0, x1 = box
            out_window = Window(x0, y0, x1 - x0, y1 - y0)
            classes = logits.argmax(dim=0).numpy().astype(np.uint8)
            classes[invalid] = NODATA_CLASS
            pred.write(classes, 1, window=out_window)
            if prob is not None:
                softmax = torch.softmax(logits, dim=0).numpy()
                softmax[:, invalid] = np.nan
                prob.write(softmax, window=out_window)
    log.info(
        "%s: %d x %d px, %d blocks of %d px, %d tiles -> %s",
        path.name, grid.height, grid.width, len(boxes), block, forwards, pred_path,
    )  # fmt: skip
    return SceneOutputs(pred_path, prob_path, forwards)


# ------------------------------------------------------------------------ classification


@torch.no_grad()
def classify_images(
    predictor: Predictor,
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
        batch = batch.to(predictor.device)
        with autocast_context(predictor.device, predictor.precision):
            out = predictor.model(batch, **_metadata(predictor, len(chunk), warned)).float()
        probabilities.append(task.probabilities(out).cpu().numpy())
        decisions.append(task.predict(out).cpu().numpy())
    k = spec.num_classes
    if not probabilities:
        return np.zeros((0, k), np.float32), np.zeros((0, k) if task.multi_label else 0, np.int64)
    return np.concatenate(probabilities), np.concatenate(decisions)


def classify_tiles(
    predictor: Predictor,
    scene: SceneInput,
    path: Path,
    out_dir: Path,
    batch_size: int,
    probabilities: bool,
    progress: bool,
) -> SceneOutputs:
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
    task, spec, src = predictor.task, predictor.spec, scene.src
    th, tw = predictor.tile or (predictor.window, predictor.window)
    sy, sx = (th, tw) if predictor.stride is None else (predictor.stride, predictor.stride)
    rows, cols = math.ceil(src.height / sy), math.ceil(src.width / sx)
    multi = bool(getattr(task, "multi_label", False))
    classes = np.full((spec.num_classes if multi else 1, rows, cols), NODATA_CLASS, np.uint8)
    probs = np.full((spec.num_classes, rows, cols), np.nan, np.float32)
    profile = {**_profile(src, 1, "uint8", NODATA_CLASS), "height": rows, "width": cols,
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
        strip = read_valid(src, scene.indexes, Window(0, top, src.width, height), spec,
                           scene.nodata, scene.factors)  # fmt: skip  # (C, height, W)
        strip = torch.from_numpy(strip)
        pad_w = max(0, (cols - 1) * sx + tw - src.width)
        strip = torch.nn.functional.pad(strip, (0, pad_w, 0, th - height), value=torch.nan)
        tiles = [strip[:, :, c * sx : c * sx + tw] for c in range(cols)]
        valid = [c for c, tile in enumerate(tiles) if not torch.isnan(tile).all()]
        p, decided = classify_images(predictor, [tiles[c] for c in valid], batch_size, warned)
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
    return SceneOutputs(pred_path, prob_path, forwards)


#: The table :func:`predict_chips` writes.
CHIP_TABLE = "predictions.csv"


def chip_rows(
    predictor: Predictor,
    paths: Sequence[Path],
    batch_size: int = 8,
    bands: Sequence[str] | None = None,
    progress: bool = True,
    sensor: str | None = None,
    reflectance_scale: float | None = None,
) -> list[list[str]]:
    """Each file of ``paths`` classified whole as one chip, as evaluation classifies a test
    image (:func:`classify_images`): its rows of :data:`CHIP_TABLE` (without the header)."""
    spec, multi = predictor.spec, bool(getattr(predictor.task, "multi_label", False))
    images, empty = [], set()
    warned_scale = False
    for path in tqdm(paths, desc="chips", disable=not progress, leave=False, dynamic_ncols=True):
        scene = open_scene(predictor, path, bands, sensor, reflectance_scale, what="chip")
        with scene.src as src:
            image = read_valid(src, scene.indexes, None, spec, scene.nodata, scene.factors)
        if np.isnan(image).all():
            empty.add(len(images))
        elif not warned_scale:  # one warning for a folder of chips, not one per chip
            medians = [float(np.median(band[np.isfinite(band)])) if np.isfinite(band).any()
                       else float("nan") for band in image]  # fmt: skip
            warned_scale = check_reflectance_scale(medians, spec, f"chip {str(path)!r}")
        images.append(torch.from_numpy(image))
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


def write_chip_table(predictor: Predictor, rows: list[list[str]], out_dir: Path) -> Path:
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
    predictor: Predictor, paths: Sequence[Path], chips: bool | None
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

    With a classification run, files are chips or scenes (:func:`split_chips`): the chips go
    into one table, ``<out_dir>/predictions.csv`` (:func:`write_chip_table`), the scenes
    each into a class raster (:func:`classify_tiles`).

    Under torchrun (a ``torch.distributed`` process group), rank ``r`` of ``world`` predicts
    scenes ``r, r + world, ...`` (and chips likewise; rank 0 writes their table).

    Args:
        predictor: from :func:`load_predictor`.
        inputs: scene files or folders.
        out_dir: the output folder.
        batch_size, block, probabilities, bands, progress: as :func:`predict_scene`.
        rank, world_size: this process's share; default from ``torch.distributed`` (0 and 1
            without a process group).
        pattern: file names taken from folders (:func:`list_scenes`); None: the images of a
            folder in the run's training layout, else every GeoTIFF.
        sensor, reflectance_scale: as :func:`predict_scene`.
        chips: classification runs: True, every file is a chip; False, every file is a scene;
            None, by size (:func:`split_chips`).

    Returns:
        What this process wrote (the chip table as one entry, on rank 0).

    Raises:
        FileNotFoundError, ValueError: as :func:`list_scenes` and :func:`predict_scene`, and
            ``chips`` given for a segmentation run.
    """
    scenes = list_scenes(inputs, pattern, predictor.file_patterns)
    if rank is None or world_size is None:
        dist = torch.distributed
        grouped = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if grouped else 0
        world_size = dist.get_world_size() if grouped else 1
    if chips is not None and not predictor.classifies:
        raise ValueError(
            f"--chips/--scenes apply to classification runs; {predictor.run_dir} is a "
            "segmentation run, which maps every file as a scene"
        )
    chip_files: list[Path] = []
    if predictor.classifies:
        chip_files, scenes = split_chips(predictor, scenes, chips)
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
        rows = chip_rows(predictor, chip_files[rank::world_size], batch_size, bands, progress,
                         sensor, reflectance_scale)  # fmt: skip
        dist = torch.distributed
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, rows)
            # Rank r holds files r, r + world, ...: put them back in the listing's order.
            rows = [row for group in zip(*gathered) for row in group] + [
                row for part in gathered for row in part[min(map(len, gathered)) :]
            ]
        if rank == 0:
            table = write_chip_table(predictor, rows, Path(out_dir).expanduser())
            log.info("%d chips -> %s", len(rows), table)
            outputs.append(SceneOutputs(table, None, len(rows)))
    return outputs
