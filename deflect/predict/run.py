"""Loading a trained run for scene prediction: its model, band manifest, window and stride."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from deflect.data import DataSpec
from deflect.engine.distributed import resolve_device
from deflect.engine.evaluator import AUTOCAST_DTYPES, autocast_context
from deflect.tasks import InferenceSettings, Task, build_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Predictor:
    """A trained model and what is needed to run it over scenes.

    Args:
        model: the model, in eval mode, on ``device``.
        spec: the band manifest it was trained on (bands, statistics, no-data, classes).
        window: the encoder input size (the run's ``img_size``).
        stride: the sliding-window stride; for a run that maps one pixel per tile, the step
            between tiles, None for tiles side by side.
        device: where the model runs.
        precision: autocast precision, ``fp32``, ``bf16`` or ``fp16``.
        run_dir: the run folder it came from.
        epoch: the epoch (1-based) of ``checkpoints/best.pt``, when recorded.
        file_patterns: file names of the run's training images and masks
            (:func:`file_patterns`): how folders are listed by default.
        task: the run's task, which writes what a scene gives (its ``scene_writer``); None is
            read as the registry's default task (:func:`~deflect.tasks.build_task` of no
            task config: callers that build a Predictor from a bare model).
        tile: ``(height, width)`` of the tiles a scene is cut into, one output pixel each, when
            the task maps tiles rather than pixels (a classification run: the size of its
            training images, ``input.json``); None for the sliding window.
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
    task: Task | None = None
    tile: tuple[int, int] | None = None
    raw_input: bool = False

    def __post_init__(self) -> None:
        if self.task is None:  # a bare model (benchmarks, tests): the registry's default task
            object.__setattr__(self, "task", build_task(None))

    def forward(self, batch: torch.Tensor, warned: set[str]) -> torch.Tensor:
        """The model's float output for a batch of tiles, on ``device`` under the run's autocast,
        with the metadata a scene can give (:func:`metadata`); ``warned`` collects the metadata
        keys already warned about."""
        batch = batch.to(self.device)
        with autocast_context(self.device, self.precision):
            return self.model(batch, **metadata(self, len(batch), warned)).float()


def metadata(predictor: Predictor, batch: int, warned: set[str]) -> dict[str, torch.Tensor]:
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
    the dataset need not be on this machine. The run's task says whether scenes are cut into
    tiles of one output pixel each (its scene writer's ``prepare``) and checks that what the
    manifest describes can be written.

    Args:
        run_dir: the run folder (or its ``adapter/`` subfolder).
        device: ``auto``, ``cpu``, ``cuda`` or a ``torch.device``.
        precision: autocast precision; None uses the run's ``precision``.
        stride: sliding-window stride; None uses the run's evaluation stride (``eval_stride``,
            else half the window), or tiles side by side for a run that maps tiles.

    Returns:
        The model in eval mode on ``device`` with its window, stride and data description.

    Raises:
        FileNotFoundError: not a run folder, or the run has no ``checkpoints/best.pt``.
        ValueError: a bad precision or stride, or a checkpoint without a band manifest.
    """
    from deflect.engine.build import build_model, build_task
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
    task = build_task(cfg)
    window = int(cfg.img_size)
    state = load_checkpoint(best)
    if not state.get("data"):
        raise ValueError(
            f"checkpoint {best} has no band manifest ('data'), so its bands and statistics are "
            "unknown; it was written by an older version: retrain the run"
        )
    spec = DataSpec.from_dict(json.loads(state["data"]))
    tile = task.scene_writer().prepare(run_dir, spec, window, str(best))
    stride = checked_stride(cfg, window, stride, tile)
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weights warnings: the checkpoint replaces them
        model = build_model(cfg, spec)
    load_model_state(model, state, str(best))
    model = model.to(dev).eval()
    epoch = int(state["epoch"]) + 1 if "epoch" in state else None
    log.info(
        "model of %s (best epoch %s): bands %s, outputs %s, window %d, %s, %s on %s",
        run_dir.name, epoch, list(spec.bands), list(spec.classes or spec.targets), window,
        f"tiles of {tile[0]} x {tile[1]} px (the training chips) brought to {window} px"
        if tile else f"stride {stride}", precision, dev,
    )  # fmt: skip
    return Predictor(
        model, spec, window, stride, dev, precision, run_dir, epoch, file_patterns(cfg), task, tile
    )


def checked_stride(
    cfg: DictConfig, window: int, stride: int | None, tile: tuple[int, int] | None
) -> int | None:
    """The stride of a run's predictions: ``stride`` when given, else the evaluation stride for
    the sliding window, else None (tiles side by side) for a run that maps tiles.

    Raises:
        ValueError: a stride outside ``[1, the tile or window side]`` (pixels no tile covers).
    """
    if stride is None and tile is None:
        stride = default_stride(cfg, window)
    if stride is not None:  # a tile-mapping run's default: tiles side by side
        stride = int(stride)
        largest = min(tile) if tile else window
        if not 1 <= stride <= largest:
            what = "tile, the training chips' size" if tile else "window, the run's img_size"
            raise ValueError(
                f"stride={stride} must be between 1 and the {what} ({largest} px); a larger "
                "stride leaves pixels no tile covers"
            )
    return stride
