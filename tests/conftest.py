"""Shared fixtures: the demo GeoTIFF cache, tiny run overrides and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    args: list[str], cwd: Path, nproc: int = 1, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``run.py`` as a user would (``python`` or ``torchrun``), from ``cwd``."""
    if nproc > 1:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(REPO / "run.py"), *args,
        ]  # fmt: skip
    else:
        cmd = [sys.executable, str(REPO / "run.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::UserWarning"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc
