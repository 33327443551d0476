"""Shared fixtures: the demo GeoTIFF cache, tiny run overrides, a CLI runner, the runs several
modules check (trained once per session, read-only: ``copy_run`` before writing into one) and
the 11-band input tensors. Fake data files are written by tests/fakes.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.fakes import SCENE_NODATA

if TYPE_CHECKING:
    import torch

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


S2_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]


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


#: The run predict.py and export.py are checked on: the tiny model (DEFLECT, the default
#: method) trained one step on the demo with the scenes' no-data value, no pictures or maps.
NODATA_DEMO_RUN = [*TINY, "epochs=1", "max_steps_per_epoch=1", f"+dataset.nodata={SCENE_NODATA}",
                   "num_vis=0", "save_predictions=false"]  # fmt: skip


@pytest.fixture(scope="session")
def nodata_demo_run(demo_root, tmp_path_factory) -> Path:
    """The run folder of ``NODATA_DEMO_RUN``, trained once per session. Read-only: a test that
    writes into a run folder (``eval_dir=``, an export) works on ``copy_run`` of it."""
    cwd = tmp_path_factory.mktemp("nodata_demo_run")
    run_cli([*NODATA_DEMO_RUN, f"dataset.root={demo_root}"], cwd)
    (run,) = (cwd / "work_dirs").iterdir()
    return run


#: A chip classifier: the tiny model trained one epoch at 16 px on ``write_chips``' chips of
#: these classes (Sentinel-2 B2, B3, B4, B8 x10000 in class folders).
CHIP_CLASSES = ["forest", "field", "water"]
CHIPS_RUN = [*TINY, "dataset=chips", "dataset.reflectance_scale=10000", "img_size=16",
             "epochs=1"]  # fmt: skip


@pytest.fixture(scope="session")
def chips_run(tmp_path_factory) -> tuple[Path, Path]:
    """``(chips, run)``: the chip folder and the run folder of ``CHIPS_RUN`` on it, trained
    once per session. Read-only: a test that writes into the run works on ``copy_run``."""
    from tests.fakes import write_chips

    cwd = tmp_path_factory.mktemp("chips_run")
    chips = write_chips(cwd / "chips", CHIP_CLASSES)
    run_cli([*CHIPS_RUN, f"dataset.root={chips}", f"work_dir={cwd / 'run'}"], cwd)
    return chips, cwd / "run"


def copy_run(run: Path, folder: Path) -> Path:
    """A copy of the run folder ``run`` under ``folder`` (same name), for a test that writes
    into it; a shared run stays as it was trained."""
    import shutil

    return Path(shutil.copytree(run, folder / run.name))


@pytest.fixture
def s2_reflectance() -> torch.Tensor:
    """Two 32-px images of the 11 Sentinel-2 bands as reflectance in [0.01, 0.51), seeded:
    positive, as spectral indices and DEFLECT's statistics expect of real input."""
    import torch

    torch.manual_seed(2)
    return torch.rand(2, len(S2_BANDS), 32, 32) * 0.5 + 0.01


@pytest.fixture
def s2_standard_normal() -> torch.Tensor:
    """Two 32-px images of the 11 Sentinel-2 bands drawn from a standard normal, seeded: input
    as normalisation leaves it (negative values included)."""
    import torch

    torch.manual_seed(2)
    return torch.randn(2, len(S2_BANDS), 32, 32)


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
