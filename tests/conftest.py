"""Shared fixtures: the demo GeoTIFF cache, tiny run overrides and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

REPO = Path(__file__).resolve().parents[1]

# A tiny but complete run: the tiny ViT (width 32, depth 4, patch 8), 32-px crops of the demo
# tiles (64 px, so evaluation goes through the sliding window), a 16-channel UperNet.
TINY = [
    "encoder=tiny_vit",
    "img_size=32",
    "segmentor.channels=16",
    "batch_size=4",
    "num_workers=0",
    "epochs=2",
    "max_steps_per_epoch=3",
    "device=cpu",
]


def north_up(west: float, north: float, xsize: float, ysize: float):
    """A north-up affine transform, built directly: rasterio's ``from_origin`` composes it with
    Affine's deprecated ``*`` and warns on every call."""
    from affine import Affine

    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


S2_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
DEMO_BANDS = ["B2", "B3", "B4", "B8"]


def s2_spec(bands: list[str] | None = None, **kwargs):
    """A DataSpec of reflectance-like bands: mean 0.1 + 0.01 i, std 0.05 + 0.002 i, scale 1."""
    from deflect.data import DataSpec

    bands = list(S2_BANDS if bands is None else bands)
    stats = {
        "mean": {b: 0.1 + 0.01 * i for i, b in enumerate(bands)},
        "std": {b: 0.05 + 0.002 * i for i, b in enumerate(bands)},
    }
    return DataSpec(bands=tuple(bands), **{**stats, **kwargs})


def tiny_encoder(data=None, output_layers=(0, 1, 2, 3), **kwargs):
    """The framework's ViTEncoder at tiny size (width 32, depth 4, patch 8, 32 px), seeded."""
    import warnings

    import torch

    from deflect.encoders import ViTEncoder

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning, tested on its own
        encoder = ViTEncoder(
            name="tiny", arch="vit_tiny_patch16_224", data=data or s2_spec(), img_size=32,
            patch_size=8, output_layers=list(output_layers),
            arch_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 4}, **kwargs,
        )  # fmt: skip
    return encoder.eval()


def encoder_on_meta(encoder: str, depth: int, data=None):
    """``configs/encoder/<encoder>.yaml`` at 224 px with every block kept (output at the last),
    built on the meta device (no memory, random-weights warning silenced): for counts."""
    import warnings

    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"encoder={encoder}", "img_size=224"])
    cfg.encoder.output_layers = [depth - 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return instantiate(cfg.encoder, _partial_=True, _convert_="all")(data=data or s2_spec())


def tiny_timm_vit(**kwargs):
    """A plain timm ViT (width 32, depth 4, patch 8, 32 px), seeded, in eval mode."""
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
        depth=4, num_heads=4, num_classes=0, **kwargs,
    ).eval()  # fmt: skip


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The demo dataset written once per test session."""
    from datasets import prepare_demo

    root = tmp_path_factory.mktemp("data") / "demo"
    prepare_demo(str(root))
    return root


def run_cli(
    args: list[str],
    cwd: Path,
    nproc: int = 1,
    check: bool = True,
    timeout: int = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``run.py`` as a user would (``python`` or ``torchrun``), from ``cwd``."""
    if nproc > 1:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(REPO / "run.py"), *args,
        ]  # fmt: skip
    else:
        cmd = [sys.executable, str(REPO / "run.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::UserWarning",
           **(env or {})}  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def load_script(name: str):
    """``scripts/<name>.py`` as a module (registered in ``sys.modules``: dataclasses look
    their module up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def copy_with_band_names(source: Path, target: Path, names: tuple[str, ...]) -> Path:
    """Every GeoTIFF under ``source`` copied to ``target`` (same pixels and profile); those with
    ``len(names)`` bands get ``names`` as their band descriptions (another sensor's names for
    the same bands), the others (masks) stay as they are."""
    import rasterio

    for path in source.rglob("*.tif"):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path) as src:
            data, profile = src.read(), src.profile
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(data)
            if len(data) == len(names):
                dst.descriptions = names
    return target


#: The no-data value the scene helpers write (as the demo's own files declare none).
SCENE_NODATA = -9999.0
SCENE_CRS = "EPSG:32633"


def demo_pixels(height: int, width: int, top: int = 150, left: int = 120) -> np.ndarray:
    """Real Sentinel-2 reflectance x10000 (the demo's source scene, bands B2, B3, B4, B8) as
    float32, with NaN pixels, no-data pixels, a pixel with one NaN band and an all-invalid
    corner."""
    from datasets.demo import demo_scene

    image = demo_scene()[:, top : top + height, left : left + width].astype(np.float32)
    image[:, 2:5, 3:9] = np.nan
    image[:, -3:, -4:] = SCENE_NODATA
    image[:, 9, 1:3] = SCENE_NODATA
    image[1, 12, 12] = np.nan  # one band invalid: still predicted
    return image


def write_scene(path: Path, image: np.ndarray, names: list[str] | None = DEMO_BANDS) -> Path:
    """``image`` (C, H, W) as a georeferenced GeoTIFF (UTM 33N, 10 m) with band ``names``."""
    profile = {"driver": "GTiff", "height": image.shape[1], "width": image.shape[2],
               "count": image.shape[0], "dtype": str(image.dtype), "crs": SCENE_CRS,
               "transform": north_up(500000.0, 5000000.0, 10.0, 10.0)}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image)
        for i, name in enumerate(names or []):
            dst.set_band_description(i + 1, name)
    return path
