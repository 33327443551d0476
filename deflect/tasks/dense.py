"""What the per-pixel tasks (segmentation, regression) share: crops with their target raster
moved alike, and scene prediction where every file is a scene."""

from __future__ import annotations

from pathlib import Path

from datasets.transforms import build_transform
from deflect.data import DataSpec

AUGMENTATION_KEYS = ("min_labelled_fraction", "hflip", "vflip", "rot90")


def dense_transform(spec: DataSpec, train: bool, img_size: int, augmentation=None):
    """Crops of ``img_size`` with their mask or target raster (training: random, with at least
    ``min_labelled_fraction`` labelled pixels, and flips); evaluation: whole tiles."""
    aug = augmentation or {}
    return build_transform(spec, train=train, crop_size=img_size,
                           **{key: aug[key] for key in AUGMENTATION_KEYS if key in aug})  # fmt: skip


def every_file_a_scene(task: str, run_dir: Path, paths: list[Path],
                       chips: bool | None) -> tuple[list, list]:  # fmt: skip
    """``(chips, scenes)`` of a per-pixel run: no chips, every file is a scene.

    Raises:
        ValueError: ``chips`` given (``--chips``/``--scenes`` only apply to image-level tasks).
    """
    if chips is not None:
        raise ValueError(
            f"--chips/--scenes apply to classification runs; {run_dir} is a {task} run, which "
            "maps every file as a scene"
        )
    return [], list(paths)
