r"""Does DEFLECT earn its place? The comparison protocol applied to planted spectral tasks.

    python scripts/spectral_study.py                  # the study (about 75 min on 2 CPU cores)
    python scripts/spectral_study.py --quick          # a few minutes: the pipeline end to end
    python scripts/spectral_study.py --launcher hydra/launcher=submitit_slurm \
        hydra.launcher.partition=cpu                  # each stage one SLURM job array

Everything is written under ``--out`` (default ``work_dirs/spectral_study``):

1. **Planted tasks** (``data/<task>/{train,val,test}``, GeoTIFFs in ``dataset=folder``'s layout:
   7 Sentinel-2 bands B2, B3, B4, B5, B8A, B11, B12 as float reflectance). A tile holds a few
   large regions (Voronoi cells with smooth borders), each drawn from its class with its own
   spectrum (class mean x a per-region, per-band factor), a per-tile illumination gain, and
   noise that is partly white and partly spatially smooth (so that averaging neighbours cannot
   remove it all). The tasks are tuned so that neither of their two oracles is at 100:

   * ``rededge_subclass``: water, vegetation and bare soil, separable in RGB, with vegetation
     split into healthy and stressed, which differ only in NIR (B8A: 0.35 against 0.31) by less
     than the illumination gain moves it, so NIR over SWIR (gain-free, as the NDMI index)
     separates them better than NIR alone;
   * ``index_threshold``: classes by NDVI (< 0.25, 0.25-0.5, >= 0.5) on regions whose red and
     NIR are drawn independently, so that RGB alone cannot tell them apart.

   Each task reports its **per-pixel oracle** (a per-pixel MLP on the 7 bands, trained on 150
   further tiles from the generator: what one pixel's spectrum tells) and its **patch oracle**
   (every 8x8 patch given its true majority class: what a model that is right about every patch
   but cannot draw borders inside one gets).

2. **An RGB encoder pretrained as a GFM would be** (``rgb_vit.pth``): a ViT (width 96, depth 6,
   3 heads, patch 8) trained by masked image modelling (SimMIM: 60 % of the patches replaced by
   a learned mask token, their pixels regressed with an L1 loss) on RGB crops of the Sentinel-2
   scene spyndex ships (real texture) and of generated scenes (fields of random colours, oriented
   textures, gradients, smooth noise). ``encoder.json`` reports its quality: the masked-patch loss
   on held-out crops, a linear probe of its frozen patch tokens on the RGB classes of
   ``rededge_subclass`` (water, vegetation, bare) against the same probe on a random encoder,
   and ‖δ_RGB‖ / ‖x‖ per block (the attention update beside the token it is added to).

3. **Stage 1**, one ``run.py -m`` sweep: every (task, training-set size) x method x encoder
   learning-rate scale, seed 0. Sizes are ``dataset.limited_label`` fractions of the 32 training
   tiles (4, 12 and 32 tiles), the subset drawn with the run's seed. Methods: ``frozen`` (RGB
   only), ``lora_auto`` (LoRA at DEFLECT's parameter count, RGB), ``spectral_kernel_new`` (the
   new bands' kernel columns only: DEFLECT's budget), ``spectral_kernel`` (the whole all-band
   kernel) and DEFLECT with ``deflection=hard``, ``embedding`` and ``none`` (one contestant:
   the deflection is chosen like the learning rate).

4. **Selection on validation** (``scripts/select_hparams.py``'s ``select``): per task, size and
   method, the learning-rate scale (and DEFLECT's deflection) with the best validation mIoU.

5. **Stage 2**, one sweep: every contestant at its chosen values, seeds 1-4 (seed 0 is stage 1's
   run at those values: the same run, not repeated).

6. **The report** (``study.md``, ``study.json``, ``study.png``): test mIoU per task, size and
   method, mean ± std and 95 % bootstrap interval over the 5 seeds, each task's two oracles, the
   paired difference of DEFLECT against each baseline (same seeds, same training subsets), the
   chosen values, and what DEFLECT's spectral stream let through (``diagnostics.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BANDS = ["B2", "B3", "B4", "B5", "B8A", "B11", "B12"]
RGB = ["B4", "B3", "B2"]
PATCH = 8

# ---- the encoder every arm shares ------------------------------------------------------------------
WIDTH, DEPTH, HEADS = 96, 6, 3
ENCODER = [
    "encoder=tiny_vit",
    f"encoder.arch_kwargs={{embed_dim:{WIDTH},depth:{DEPTH},num_heads:{HEADS}}}",
    "encoder.output_layers=[1,3,4,5]",
    "segmentor.channels=64",
]


@dataclass(frozen=True)
class Scale:
    """How big the study is."""

    tile: int  # pixels a side
    tiles: dict  # split -> tiles written
    sizes: tuple  # (training tiles, epochs, val_every, batch) per point of the learning curve
    pretrain_steps: int
    seeds: tuple  # stage 2's seeds (seed 0 is stage 1's)
    lr_scales: tuple  # encoder_lr_scale grid of stage 1
    methods: tuple
    oracle_tiles: int = 150
    tasks: tuple = ("rededge_subclass", "index_threshold")


#: study-only finetune options: DEFLECT with one deflection each, and embedding deflection with
#: UPE's features standardised (one contestant: which of them is chosen on validation)
DEFLECT_OPTIONS = {
    "deflect_hard": {"deflection": "hard"},
    "deflect_embedding": {"deflection": "embedding"},
    "deflect_none": {"deflection": "none"},
    "deflect_embedding_std": {"deflection": "embedding", "standardise_features": True},
}
DEFLECT_FAMILY = tuple(DEFLECT_OPTIONS)
SCALES = {
    "default": Scale(
        tile=64,
        tiles={"train": 32, "val": 8, "test": 16},
        sizes=((4, 100, 5, 4), (12, 50, 5, 6), (32, 40, 4, 8)),
        pretrain_steps=1500,
        seeds=(1, 2, 3, 4),
        lr_scales=(3, 30),
        methods=("frozen", "lora_auto", "spectral_kernel_new", "spectral_kernel", *DEFLECT_FAMILY),
    ),
    "quick": Scale(
        tile=32,
        tiles={"train": 8, "val": 4, "test": 4},
        sizes=((4, 2, 1, 4), (8, 2, 2, 8)),
        pretrain_steps=8,
        seeds=(1,),
        lr_scales=(10,),
        methods=("frozen", "spectral_kernel_new", "deflect_hard", "deflect_embedding"),
        oracle_tiles=12,
    ),
}
#: what the tables call each contestant
LABELS = {
    "frozen": "frozen (RGB only)",
    "lora_auto": "LoRA at DEFLECT's budget (RGB)",
    "spectral_kernel_new": "new-band kernel (DEFLECT's budget)",
    "spectral_kernel": "all-band kernel",
    "deflect": "DEFLECT",
}


# ---- planted tasks ---------------------------------------------------------------------------------
def smooth(noise: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of the last two axes (periodic borders, through the FFT)."""
    ky = np.exp(-2 * (np.pi * sigma * np.fft.fftfreq(noise.shape[-2])) ** 2)
    kx = np.exp(-2 * (np.pi * sigma * np.fft.fftfreq(noise.shape[-1])) ** 2)
    return np.real(np.fft.ifft2(np.fft.fft2(noise) * ky[:, None] * kx[None, :]))


def class_map(rng: np.random.Generator, size: int, regions: int) -> np.ndarray:
    """``regions`` Voronoi cells with smooth, wavy borders: the cell index of every pixel."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    centres = rng.uniform(0, size, (regions, 2))
    jitter = smooth(rng.normal(0, size / 5, (2, size, size)), size / 10)
    d = ((ys[None] + jitter[0] - centres[:, 0, None, None]) ** 2
         + (xs[None] + jitter[1] - centres[:, 1, None, None]) ** 2)  # fmt: skip
    return d.argmin(axis=0)


# Mean reflectance per class and band (B2, B3, B4, B5, B8A, B11, B12).
REDEDGE = {
    "classes": ["water", "healthy_vegetation", "stressed_vegetation", "bare_soil"],
    "means": [
        [0.07, 0.06, 0.04, 0.03, 0.02, 0.01, 0.01],
        [0.04, 0.08, 0.05, 0.13, 0.35, 0.22, 0.11],
        [0.04, 0.08, 0.05, 0.13, 0.31, 0.22, 0.11],
        [0.12, 0.15, 0.19, 0.22, 0.26, 0.32, 0.27],
    ],
}
NDVI_EDGES = (0.25, 0.5)
NOISE = {"white": 0.01, "smooth": 0.015, "smooth_px": 3.0, "region": 0.05, "gain": 0.2}


def planted_tile(task: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One tile of ``task``: reflectance ``(7, size, size)`` float32 and its class mask."""
    if task == "index_threshold":
        regions = 4
        cells = class_map(rng, size, regions)
        red = rng.uniform(0.03, 0.15, regions)
        nir = rng.uniform(0.05, 0.45, regions)
        labels = np.digitize((nir - red) / (nir + red), NDVI_EDGES)  # 0: < 0.25, ...
        means = np.stack(
            [red * 0.7, red * 0.9, red, red * 1.2 + 0.02, nir, 0.5 * nir + 0.05, 0.3 * nir + 0.03],
            axis=1,
        )  # fmt: skip  (regions, 7)
    elif task == "rededge_subclass":
        regions = 3
        cells = class_map(rng, size, regions)
        labels = rng.permutation(len(REDEDGE["classes"]))[:regions]
        means = np.asarray(REDEDGE["means"])[labels]
        means = means * (1 + rng.normal(0, NOISE["region"], means.shape))
    else:
        raise KeyError(f"unknown task {task!r}: one of rededge_subclass, index_threshold")
    gain = rng.uniform(1 - NOISE["gain"], 1 + NOISE["gain"])  # illumination, per tile
    image = means[cells].transpose(2, 0, 1) * gain
    field_ = smooth(rng.normal(0, 1, image.shape), NOISE["smooth_px"])
    field_ *= NOISE["smooth"] / field_.std()
    image = image + field_ + rng.normal(0, NOISE["white"], image.shape)
    return np.clip(image, 0.001, 1).astype(np.float32), labels[cells].astype(np.uint8)


def task_classes(task: str) -> list[str]:
    if task == "index_threshold":
        return ["ndvi_low", "ndvi_mid", "ndvi_high"]
    return list(REDEDGE["classes"])


def write_geotiff(path: Path, data: np.ndarray, descriptions: list[str] | None = None) -> None:
    import rasterio
    from affine import Affine

    data = data[None] if data.ndim == 2 else data
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "height": data.shape[1], "width": data.shape[2],
               "count": data.shape[0], "dtype": str(data.dtype), "crs": "EPSG:32631",
               "transform": Affine(10, 0, 500000, 0, -10, 5000000)}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            dst.descriptions = tuple(descriptions)


def write_task(root: Path, task: str, scale: Scale, seed: int = 0) -> Path:
    """``<root>/<task>/{train,val,test}/t<n>_image.tif + _mask.tif`` (kept when complete)."""
    folder = root / task
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, count in scale.tiles.items():
        for i in range(count):
            image, mask = planted_tile(task, rng, scale.tile)
            write_geotiff(folder / split / f"t{i:03d}_image.tif", image, BANDS)
            write_geotiff(folder / split / f"t{i:03d}_mask.tif", mask)
    (folder / "done").write_text("")
    return folder


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 7, H, W), masks (N, H, W))`` of one split of a planted task."""
    import rasterio

    images, masks = [], []
    for path in sorted((folder / split).glob("*_image.tif")):
        with rasterio.open(path) as src:
            images.append(src.read())
        with rasterio.open(str(path).replace("_image", "_mask")) as src:
            masks.append(src.read(1))
    return np.stack(images), np.stack(masks)


# ---- the two oracles -------------------------------------------------------------------------------
def miou(pred: np.ndarray, truth: np.ndarray, classes: int) -> float:
    """Mean IoU (%) over the classes present in ``truth`` or ``pred``."""
    ious = []
    for c in range(classes):
        union = ((pred == c) | (truth == c)).sum()
        if union:
            ious.append(((pred == c) & (truth == c)).sum() / union)
    return 100 * float(np.mean(ious))


def patch_oracle(masks: np.ndarray, classes: int, patch: int = PATCH) -> float:
    """mIoU (%) of giving every ``patch`` x ``patch`` cell its true majority class."""
    n, h, w = masks.shape
    cells = masks.reshape(n, h // patch, patch, w // patch, patch).transpose(0, 1, 3, 2, 4)
    counts = np.stack([(cells == c).sum(axis=(-1, -2)) for c in range(classes)], axis=-1)
    majority = counts.argmax(-1)  # (n, h/p, w/p); ties: the lowest class
    pred = majority.repeat(patch, axis=1).repeat(patch, axis=2)
    return miou(pred, masks, classes)


def pixel_oracle(task: str, scale: Scale, test: tuple[np.ndarray, np.ndarray],
                 seed: int = 1000) -> float:  # fmt: skip
    """mIoU (%) on ``test`` of a per-pixel MLP (7 -> 64 -> 64 -> classes) trained on the pixels
    of ``scale.oracle_tiles`` further tiles from the generator (seed ``seed``): what one pixel's
    spectrum tells, learned from far more labelled pixels than any arm gets."""
    import torch

    rng = np.random.default_rng(seed)
    tiles = [planted_tile(task, rng, scale.tile) for _ in range(scale.oracle_tiles)]
    x = torch.tensor(np.concatenate([t[0].reshape(7, -1).T for t in tiles]))
    y = torch.tensor(np.concatenate([t[1].ravel() for t in tiles])).long()
    k = len(task_classes(task))
    mean, std = x.mean(0), x.std(0)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(7, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, k))  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(1500 if scale.oracle_tiles > 50 else 100):
        idx = torch.randint(0, len(x), (4096,), generator=generator)
        loss = torch.nn.functional.cross_entropy(net((x[idx] - mean) / std), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    images, masks = test
    pixels = torch.tensor(images.transpose(0, 2, 3, 1).reshape(-1, 7))
    with torch.no_grad():
        pred = net((pixels - mean) / std).argmax(1).numpy()
    return miou(pred, masks.ravel(), k)


# ---- the RGB encoder, pretrained by masked image modelling ---------------------------------------
def new_vit(tile: int):
    """The timm ViT the arms load (``encoder=tiny_vit`` with the study's arch), RGB in."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=tile,
                             patch_size=PATCH, in_chans=3, num_classes=0, global_pool="",
                             embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)  # fmt: skip


def sentinel_rgb() -> np.ndarray:
    """spyndex's Sentinel-2 sample (300 x 300 px, 10 m) as reflectance ``(3, H, W)``, B4 B3 B2."""
    import spyndex

    scene = spyndex.datasets.open("sentinel")
    bands = [str(b) for b in scene.coords["band"].values]
    return np.stack([np.asarray(scene[bands.index(b)], dtype=np.float32) / 10000
                     for b in ("B04", "B03", "B02")])  # fmt: skip


def pretraining_crop(rng: np.random.Generator, size: int, scene: np.ndarray) -> np.ndarray:
    """One RGB crop ``(3, size, size)``: half from the real scene (flipped, rotated, brightness
    jittered), half generated (regions of random colours, each plain, striped at a random angle
    and period, or a gradient, plus smooth noise)."""
    if rng.random() < 0.5:
        y, x = rng.integers(0, scene.shape[1] - size), rng.integers(0, scene.shape[2] - size)
        crop = np.rot90(scene[:, y : y + size, x : x + size], rng.integers(4), axes=(1, 2))
        crop = crop[:, :, ::-1] if rng.random() < 0.5 else crop
        return np.ascontiguousarray(crop * rng.uniform(0.8, 1.2))
    regions = int(rng.integers(2, 7))
    cells = class_map(rng, size, regions)
    colours = rng.uniform(0.02, 0.25, (regions, 3))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    image = colours[cells].transpose(2, 0, 1)
    for r in range(regions):
        kind = rng.integers(3)
        theta, period = rng.uniform(0, np.pi), rng.uniform(2, 12)
        ramp = xs * np.cos(theta) + ys * np.sin(theta)
        pattern = (np.sin(2 * np.pi * ramp / period) if kind == 1
                   else (ramp / size - 0.5) if kind == 2 else 0 * ramp)  # fmt: skip
        image = image + rng.uniform(0.01, 0.05) * pattern[None] * (cells == r)[None]
    image = image + smooth(rng.normal(0, 0.02, image.shape), 2) + rng.normal(0, 0.005, image.shape)
    return np.clip(image, 0.001, 1).astype(np.float32)


def simmim_loss(vit, head, mask_token, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SimMIM: masked patches' embeddings replaced by ``mask_token``, their pixels regressed
    (L1) from the encoder's output tokens through the linear ``head``."""
    import torch

    tokens = vit.patch_embed(x)  # (B, N, D)
    tokens = torch.where(mask[..., None], mask_token.to(tokens.dtype), tokens)
    tokens = vit.norm_pre(vit._pos_embed(tokens))
    tokens = vit.norm(vit.blocks(tokens))[:, vit.num_prefix_tokens :]
    b, n, _ = tokens.shape
    g = int(math.isqrt(n))
    target = x.reshape(b, 3, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, n, -1)
    return (head(tokens) - target).abs().mean(-1)[mask].mean()


def pretrain_rgb_encoder(out: Path, scale: Scale, log) -> Path:
    """SimMIM on generated and real RGB crops; writes ``rgb_vit.pth`` (timm key names) and
    ``pretraining.json`` (loss curve, band statistics, time)."""
    import torch

    path = out / "rgb_vit.pth"
    if path.is_file():
        return path
    start = time.time()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    scene = sentinel_rgb()
    sample = np.stack([pretraining_crop(rng, scale.tile, scene) for _ in range(256)])
    mean = sample.mean(axis=(0, 2, 3))[:, None, None]
    std = sample.std(axis=(0, 2, 3))[:, None, None]
    vit = new_vit(scale.tile)
    head = torch.nn.Linear(WIDTH, 3 * PATCH * PATCH)
    mask_token = torch.nn.Parameter(torch.zeros(WIDTH))
    params = [*vit.parameters(), *head.parameters(), mask_token]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    steps = scale.pretrain_steps
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup)
                                              * 0.5 * (1 + math.cos(math.pi * s / steps)))  # fmt: skip
    n = (scale.tile // PATCH) ** 2
    curve = []
    for step in range(steps):
        batch = np.stack([pretraining_crop(rng, scale.tile, scene) for _ in range(32)])
        x = torch.tensor((batch - mean) / std, dtype=torch.float32)
        mask = torch.rand(len(x), n).argsort(1) < int(0.6 * n)
        loss = simmim_loss(vit, head, mask_token, x, mask)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"  pretraining step {step + 1}/{steps}  masked L1 {curve[-1]:.4f}")
    # held-out masked loss of the trained model and of the untrained one (same head training
    # would be fairer for the second; its loss at step 0 is the reference here)
    rng_eval = np.random.default_rng(123)
    held = np.stack([pretraining_crop(rng_eval, scale.tile, scene) for _ in range(128)])
    x = torch.tensor((held - mean) / std, dtype=torch.float32)
    mask = torch.rand(len(x), n, generator=torch.Generator().manual_seed(1)).argsort(1) < int(
        0.6 * n
    )
    with torch.no_grad():
        held_loss = float(simmim_loss(vit, head, mask_token, x, mask))
        zero = float(x.reshape(len(x), 3, -1).abs().mean())  # predicting the mean (0)
    torch.save(vit.state_dict(), path)
    (out / "pretraining.json").write_text(json.dumps({
        "objective": "SimMIM: 60 % of patches masked, L1 on their normalised pixels",
        "steps": steps, "batch": 32, "images_seen": steps * 32,
        "first_loss": curve[0], "last_loss": curve[-1], "held_out_loss": held_loss,
        "held_out_loss_of_predicting_the_mean": zero,
        "minutes": (time.time() - start) / 60, "curve_every_50": curve[::50],
    }, indent=1))  # fmt: skip
    return path


def token_norms(vit, x: torch.Tensor) -> list[dict]:
    """Per block, the medians over tokens of ‖x‖ entering it and ‖δ_RGB‖ / ‖x‖ (its attention
    update, after LayerScale)."""
    import torch

    rows = []
    with torch.no_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for block in vit.blocks:
            update = block.drop_path1(block.ls1(block.attn(block.norm1(tokens))))
            norm = tokens.norm(dim=-1)
            rows.append({"x": float(norm.median()),
                         "delta_rgb_over_x": float((update.norm(dim=-1) / norm).median())})  # fmt: skip
            tokens = block(tokens)
    return rows


def ridge_probe(train_x, train_y, test_x, test_y, classes: int, alpha: float = 1.0) -> float:
    """Accuracy (%) of a ridge-regression classifier (one-hot targets, standardised features,
    closed form) fitted on ``train`` and scored on ``test``."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.c_[(train_x - mean) / std, np.ones(len(train_x))]
    b = np.c_[(test_x - mean) / std, np.ones(len(test_x))]
    weights = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ np.eye(classes)[train_y])
    return 100 * float(((b @ weights).argmax(1) == test_y).mean())


def patch_majority(masks: np.ndarray, classes: int) -> np.ndarray:
    """The majority class of every patch, ``(N * h * w,)`` in row-major patch order."""
    n, h, w = masks.shape
    cells = masks.reshape(n, h // PATCH, PATCH, w // PATCH, PATCH).transpose(0, 1, 3, 2, 4)
    counts = np.stack([(cells == c).sum(axis=(-1, -2)) for c in range(classes)], axis=-1)
    return counts.argmax(-1).ravel()


def block_tokens(vit, x: torch.Tensor) -> list[np.ndarray]:
    """The patch tokens after each block, ``(N * patches, D)`` per block (prefix tokens left out)."""
    import torch

    per_block = []
    with torch.no_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for block in vit.blocks:
            tokens = block(tokens)
            per_block.append(tokens[:, vit.num_prefix_tokens :].flatten(0, 1).numpy())
    return per_block


def encoder_quality(out: Path, scale: Scale, data: Path) -> dict:
    """The pretrained encoder against a random one of the same shape: a linear probe of the
    frozen patch tokens (blocks 1 and 5) on ``rededge_subclass``'s RGB classes (water,
    vegetation, bare: healthy and stressed merged, they differ beyond RGB), and ‖δ_RGB‖ / ‖x‖."""
    import torch

    result = {"pretraining": json.loads((out / "pretraining.json").read_text())}
    splits = {s: read_split(data, s) for s in ("train", "test")}
    rgb = [BANDS.index(b) for b in RGB]
    mean = splits["train"][0][:, rgb].mean(axis=(0, 2, 3))[:, None, None]
    std = splits["train"][0][:, rgb].std(axis=(0, 2, 3))[:, None, None]
    merged = np.array([0, 1, 1, 2])  # water, vegetation, vegetation, bare
    for name in ("pretrained", "random"):
        torch.manual_seed(0)
        vit = new_vit(scale.tile)
        if name == "pretrained":
            vit.load_state_dict(torch.load(out / "rgb_vit.pth", weights_only=True))
        vit.eval()
        features = {}
        for split, (images, masks) in splits.items():
            x = torch.tensor((images[:, rgb] - mean) / std, dtype=torch.float32)
            per_block = block_tokens(vit, x)
            features[split] = (per_block, merged[patch_majority(masks, 4)])
            if split == "test":
                result.setdefault("norms", {})[name] = token_norms(vit, x)
        result.setdefault("probe", {})[name] = {
            f"block {b}": ridge_probe(features["train"][0][b], features["train"][1],
                                      features["test"][0][b], features["test"][1], 3)
            for b in (1, DEPTH - 1)
        }  # fmt: skip
        texture = {}
        for split, count in (("train", 32), ("test", 16)):
            images, labels = orientation_tiles(np.random.default_rng(len(split)), count, scale.tile)
            x = torch.tensor((images - mean) / std, dtype=torch.float32)
            per_block = block_tokens(vit, x)
            texture[split] = (per_block, labels.repeat(len(per_block[0]) // len(labels)))
        result.setdefault("orientation_probe", {})[name] = {
            f"block {b}": ridge_probe(texture["train"][0][b], texture["train"][1],
                                      texture["test"][0][b], texture["test"][1], 4)
            for b in (1, DEPTH - 1)
        }  # fmt: skip
    return result


def orientation_tiles(rng: np.random.Generator, count: int, size: int):
    """RGB tiles of one random colour with stripes at one of 4 orientations (0, 45, 90, 135°,
    ±10°), random period and phase: ``(images (N, 3, H, W), orientation class (N,))``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    labels = rng.integers(0, 4, count)
    images = []
    for c in labels:
        theta = np.deg2rad(45 * c + rng.uniform(-10, 10))
        ramp = xs * np.cos(theta) + ys * np.sin(theta)
        stripes = np.sin(2 * np.pi * ramp / rng.uniform(4, 10) + rng.uniform(0, 2 * np.pi))
        colour = rng.uniform(0.03, 0.2, 3)[:, None, None]
        images.append(colour + 0.03 * stripes[None] + rng.normal(0, 0.005, (3, size, size)))
    return np.stack(images).astype(np.float32), labels


# ---- the sweeps ------------------------------------------------------------------------------------
def size_name(task: str, tiles: int) -> str:
    return f"{task}_n{tiles}"


def write_configs(out: Path, scale: Scale, folders: dict[str, Path]) -> Path:
    """``<out>/configs``, a Hydra search path: one ``study`` option per task and training-set
    size (``# @package _global_``, appended with ``+study=``, so that its epochs, validation
    interval and batch size win over the defaults: the folder dataset on the task, the subset
    drawn with the run's seed) and the ``finetune`` options of DEFLECT's family."""
    from omegaconf import OmegaConf

    root = out / "configs"
    for task, folder in folders.items():
        for tiles, epochs, val_every, batch in scale.sizes:
            dataset = {"root": str(folder), "classes": task_classes(task), "ignore_index": 255,
                       "reflectance_scale": 1, "img_size": scale.tile,
                       "limited_label": round(tiles / scale.tiles["train"], 6),
                       "limited_label_seed": "${seed}"}  # fmt: skip
            text = OmegaConf.to_yaml(OmegaConf.create({"dataset": dataset, "epochs": epochs,
                                                       "val_every": val_every,
                                                       "batch_size": batch}))  # fmt: skip
            path = root / "study" / f"{size_name(task, tiles)}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("# @package _global_\n# written by scripts/spectral_study.py\n"
                            "defaults:\n  - override /dataset: folder\n" + text)  # fmt: skip
    for name in DEFLECT_FAMILY:
        path = root / "finetune" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        values = "".join(f"{k}: {str(v).lower()}\n" for k, v in DEFLECT_OPTIONS[name].items())
        path.write_text("defaults:\n  - deflect\n  - _self_\n" + values)
    return root


def common_args(out: Path, checkpoint: Path) -> list[str]:
    return [*ENCODER, f"encoder.checkpoint={checkpoint}", "optimizer.lr=1e-3", "num_workers=0", "save_predictions=false", "num_vis=0", "resume=true"]  # fmt: skip


def sweep(args: list[str], sweep_dir: Path, launcher: list[str], log_path: Path) -> None:
    """One ``run.py -m`` sweep into ``sweep_dir``; its output goes to ``log_path``."""
    cmd = [sys.executable, str(REPO / "run.py"), "-m", *args, *launcher,
           f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    env = dict(os.environ)
    with open(log_path, "a") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"run.py -m failed ({proc.returncode}); see {log_path}")


def default_launcher(jobs: int) -> list[str]:
    """Hydra's joblib launcher with ``jobs`` processes of one thread each, when installed and
    ``jobs`` > 1; else the basic launcher (one job after another)."""
    if jobs <= 1:
        return []
    try:
        import hydra_plugins.hydra_joblib_launcher  # noqa: F401
    except ImportError:
        print("note: hydra-joblib-launcher is not installed (pip install -e '.[parallel]'): "
              "jobs run one after another", flush=True)  # fmt: skip
        return []
    os.environ["OMP_NUM_THREADS"] = "1"
    return ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]


def select_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("select_hparams", REPO / "scripts" /
                                                  "select_hparams.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Contestant:
    """One method on one task and size: its chosen values and its test mIoU per seed."""

    task: str
    tiles: int
    method: str
    chosen: dict
    validation: float
    candidates: list
    test: dict = field(default_factory=dict)  # seed -> test mIoU (%)
    trainable: int | None = None
    stage1: Path | None = None  # the seed-0 run at the chosen values


def job_settings(folder: Path) -> dict[str, str]:
    overrides = json.loads((folder / "job.json").read_text()).get("overrides", [])
    return dict(item.split("=", 1) for item in overrides if "=" in item)


def test_of(folder: Path) -> tuple[float, int]:
    metrics = json.loads((folder / "metrics.json").read_text())
    return 100 * metrics["test"]["mIoU"], metrics["params"]["encoder_trainable"]


# ---- what DEFLECT's spectral stream let through ---------------------------------------------------
def diagnose(run_dir: Path) -> dict:
    """A trained DEFLECT run on its test split. Per target block (medians over tokens): ‖x‖
    entering it, ‖δ_RGB‖ (the frozen attention update), ‖δ_uAtt‖ (the untangled one), the
    update actually added, the angle between δ_uAtt and δ_RGB, and the added update over ‖x‖.
    Per output level of the encoder: a linear probe (ridge, closed form) of the patch tokens on
    their majority class, fitted on the training tiles, accuracy on the test tiles. And the
    gradient norm reaching UPE's projection on one training batch."""
    import torch

    from deflect.engine import build
    from deflect.predict import load_predictor
    from deflect.tuners.deflect import layer as deflect_layer

    predictor = load_predictor(run_dir, device="cpu")
    model = predictor.model
    cfg = __import__("omegaconf").OmegaConf.load(run_dir / "config.yaml")
    classes = len(cfg.dataset.classes)
    records: list[dict] = []
    update, embedding = deflect_layer.deflect_update, deflect_layer.deflect_embedding

    def record_update(delta_uatt, delta_rgb, mode="hard", eps=1e-6):
        out = update(delta_uatt, delta_rgb, mode, eps)
        records.append({"uatt": delta_uatt, "rgb": delta_rgb, "added": out})
        return out

    def record_embedding(x, delta_uatt, delta_rgb, eps=1e-6):
        out = embedding(x, delta_uatt, delta_rgb, eps)
        records.append({"uatt": delta_uatt, "rgb": delta_rgb, "added": out})
        return out

    blocks = model.encoder.base_model.vit.blocks
    targets = [i for i, b in enumerate(blocks) if getattr(b, "deflect_uatt", None)]
    inputs: list[torch.Tensor] = []
    hooks = [blocks[i].register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
             for i in targets]  # fmt: skip

    def encode(split: str, keep: bool):
        data = build.build_dataset(cfg, split)
        feats, labels = [], []
        for i in range(len(data)):
            sample = data[i]
            if keep:
                deflect_layer.deflect_update = record_update
                deflect_layer.deflect_embedding = record_embedding
            try:
                feats.append([f.flatten(2).transpose(1, 2)[0].numpy()
                              for f in model.encoder(sample["image"][None])])  # fmt: skip
            finally:
                deflect_layer.deflect_update, deflect_layer.deflect_embedding = update, embedding
            labels.append(patch_majority(sample["mask"].numpy()[None], classes))
        return feats, np.concatenate(labels)

    model.eval()
    try:
        with torch.no_grad():
            test_feats, test_y = encode("test", keep=True)
            n_inputs = len(inputs)
            train_feats, train_y = encode("train", keep=False)
    finally:
        for hook in hooks:
            hook.remove()
    inputs = inputs[:n_inputs]
    out: dict = {"blocks": []}
    n = len(targets)
    for k, block in enumerate(targets):
        rec = records[k::n]
        x = torch.cat(inputs[k::n]).flatten(0, 1)
        uatt = torch.cat([r["uatt"] for r in rec]).flatten(0, 1)
        rgb = torch.cat([r["rgb"] for r in rec]).flatten(0, 1)
        added = torch.cat([r["added"] for r in rec]).flatten(0, 1)
        cos = torch.nn.functional.cosine_similarity(uatt, rgb, dim=-1).clamp(-1, 1)
        out["blocks"].append({
            "block": block,
            "x": float(x.norm(dim=-1).median()),
            "delta_rgb": float(rgb.norm(dim=-1).median()),
            "delta_uatt": float(uatt.norm(dim=-1).median()),
            "added": float(added.norm(dim=-1).median()),
            "angle_deg": float(torch.rad2deg(torch.acos(cos)).median()),
            "added_over_x": float((added.norm(dim=-1) / x.norm(dim=-1)).median()),
        })  # fmt: skip
    out["probe"] = [
        ridge_probe(np.concatenate([f[level] for f in train_feats]), train_y,
                    np.concatenate([f[level] for f in test_feats]), test_y, classes)
        for level in range(len(test_feats[0]))
    ]  # fmt: skip
    model.train()
    train = build.build_dataset(cfg, "train")
    count = min(8, len(train))
    batch = torch.stack([train[i]["image"] for i in range(count)])
    target = torch.stack([train[i]["mask"] for i in range(count)]).long()
    loss = torch.nn.functional.cross_entropy(model(batch), target, ignore_index=255)
    loss.backward()
    upe = model.encoder.base_model.vit.patch_embed.deflect_upe["default"]
    out["grad_upe"] = float(upe.projection.weight.grad.norm())
    return out


# ---- the study -------------------------------------------------------------------------------------
def stage1(out: Path, scale: Scale, launcher: list[str], checkpoint: Path, log) -> Path:
    """Every task x size x method x lr scale, seed 0, in one sweep (kept when complete)."""
    folder = out / "stage1"
    studies = [size_name(t, n) for t in scale.tasks for n, *_ in scale.sizes]
    expected = len(studies) * len(scale.methods) * len(scale.lr_scales)
    if len(list(folder.glob("*/metrics.json"))) < expected:
        sweep([f"hydra.searchpath=[file://{out / 'configs'}]", f"+study={','.join(studies)}",
               f"finetune={','.join(scale.methods)}",
               f"encoder_lr_scale={','.join(str(s) for s in scale.lr_scales)}", "seed=0",
               *common_args(out, checkpoint)], folder, launcher, out / "study.log")  # fmt: skip
    log(f"stage 1: {expected} runs in {folder}")
    return folder


def select(out: Path, stage1_dir: Path, scale: Scale) -> tuple[dict, dict]:
    """Per task, size and method, the values with the best validation mIoU (never test)."""
    script = select_script()
    trials = script.collect_trials(stage1_dir)
    families = {"deflect": list(d for d in DEFLECT_FAMILY if d in scale.methods)}
    chosen, contestant, common = script.select(trials, "mIoU", True, families=families)
    script.write_selection(stage1_dir, chosen, common, len(scale.seeds) + 1, "mIoU", True)
    return chosen, common


def contestants(chosen: dict, stage1_dir: Path) -> dict[str, Contestant]:
    """The selection as :class:`Contestant` s, each with its seed-0 result from stage 1."""
    runs = {}
    for folder in sorted(p for p in stage1_dir.iterdir() if (p / "metrics.json").is_file()):
        runs[tuple(sorted(job_settings(folder).items()))] = folder
    table = {}
    for name, entry in chosen.items():
        task, tiles = entry["groups"]["+study"].rsplit("_n", 1)
        method = (
            "deflect"
            if entry["groups"]["finetune"] in DEFLECT_FAMILY
            else entry["groups"]["finetune"]
        )
        item = Contestant(task, int(tiles), method, entry["chosen"], entry["validation"],
                          entry["candidates"])  # fmt: skip
        for key, folder in runs.items():
            settings = dict(key)
            wanted = {**entry["groups"], **entry["chosen"]}
            if all(settings.get(k) == str(v) for k, v in wanted.items()):
                item.stage1 = folder
                item.test[0], item.trainable = test_of(folder)
        table[name] = item
    return table


def stage2(out: Path, scale: Scale, launcher: list[str], checkpoint: Path, names: list[str],
           log) -> Path:  # fmt: skip
    """Every contestant at its chosen values, the remaining seeds, in one sweep."""
    folder = out / "stage2"
    expected = len(names) * len(scale.seeds)
    if len(list(folder.glob("*/metrics.json"))) < expected:
        search = f"hydra.searchpath=[file://{out / 'stage1' / 'selected'},file://{out / 'configs'}]"
        sweep([search, f"+selected={','.join(names)}",
               f"seed={','.join(str(s) for s in scale.seeds)}", *common_args(out, checkpoint)],
              folder, launcher, out / "study.log")  # fmt: skip
    log(f"stage 2: {expected} runs in {folder}")
    return folder


def collect_stage2(stage2_dir: Path, table: dict[str, Contestant]) -> None:
    for folder in sorted(p for p in stage2_dir.iterdir() if (p / "metrics.json").is_file()):
        settings = job_settings(folder)
        item = table[settings["+selected"]]
        item.test[int(settings["seed"])], item.trainable = test_of(folder)


def fmt_summary(values: list[float]) -> str:
    from deflect.compare import summarise

    s = summarise(values)
    return f"{s.mean:.1f} ± {s.std:.1f} [{s.lo:.1f}, {s.hi:.1f}]"


def report(out: Path, scale: Scale, table: dict[str, Contestant], oracles: dict,
           quality: dict, diagnostics: dict, minutes: dict) -> str:  # fmt: skip
    """``study.md``: per task, a table of sizes x methods with the oracles, the paired
    differences of DEFLECT against each baseline, the chosen values, the encoder, the stream."""
    from deflect.compare import paired_difference

    methods = list(dict.fromkeys(c.method for c in table.values()))
    lines = ["# Spectral study", "",
             f"Tiles {scale.tile} px, patch {PATCH}; training sets of "
             f"{', '.join(str(n) for n, *_ in scale.sizes)} tiles "
             f"(epochs {', '.join(str(e) for _, e, *_ in scale.sizes)}, batches of "
             f"{', '.join(str(b) for *_, b in scale.sizes)} tiles), "
             f"{scale.tiles['val']} validation and {scale.tiles['test']} test tiles; seeds "
             f"0-{max(scale.seeds)} (the training subset drawn with the seed). Test mIoU (%): "
             "mean ± std [95 % bootstrap interval of the mean]. Learning-rate scale (and "
             "DEFLECT's deflection) chosen per task, size and method on validation, seed 0.",
             ""]  # fmt: skip
    for task in scale.tasks:
        o = oracles[task]
        lines += [f"## {task}", "",
                  f"Per-pixel oracle {o['pixel']:.1f}, patch oracle {o['patch']:.1f} (test mIoU).",
                  "", "| method | trainable | " +
                  " | ".join(f"{n} tiles" for n, *_ in scale.sizes) + " |",
                  "|---|---|" + "---|" * len(scale.sizes)]  # fmt: skip
        for method in methods:
            cells, trainable = [], None
            for n, *_ in scale.sizes:
                item = next((c for c in table.values() if (c.task, c.tiles, c.method) ==
                             (task, n, method)), None)  # fmt: skip
                if item is None or not item.test:
                    cells.append("-")
                    continue
                trainable = item.trainable
                cells.append(fmt_summary([item.test[s] for s in sorted(item.test)]))
            lines.append(f"| {LABELS.get(method, method)} | {trainable or 0:,} | "
                         + " | ".join(cells) + " |")  # fmt: skip
        lines += ["", "DEFLECT minus each method, paired by seed (points; > 0: DEFLECT better; "
                  "95 % bootstrap interval of the per-seed differences):", "",
                  "| against | " + " | ".join(f"{n} tiles" for n, *_ in scale.sizes) + " |",
                  "|---|" + "---|" * len(scale.sizes)]  # fmt: skip
        for method in (m for m in methods if m != "deflect"):
            cells = []
            for n, *_ in scale.sizes:
                pick = {c.method: c for c in table.values() if (c.task, c.tiles) == (task, n)}
                if "deflect" not in pick or method not in pick:
                    cells.append("-")
                    continue
                d = paired_difference(pick["deflect"].test, pick[method].test)
                verdict = "win" if d.lo > 0 else "loss" if d.hi < 0 else "tie"
                cells.append(f"{d.mean:+.1f} [{d.lo:+.1f}, {d.hi:+.1f}] {verdict}")
            lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
        lines += ["", "Chosen on validation (encoder lr scale; DEFLECT: deflection too), "
                  "validation mIoU of the choice:", ""]  # fmt: skip
        for n, *_ in scale.sizes:
            picks = [c for c in table.values() if (c.task, c.tiles) == (task, n)]
            text = "; ".join(
                f"{c.method} " + " ".join(f"{k.split('.')[-1]}={v}" for k, v in c.chosen.items())
                + f" ({100 * c.validation:.1f})" for c in picks)  # fmt: skip
            lines.append(f"* {n} tiles: {text}")
        lines.append("")
    pre = quality["pretraining"]
    lines += ["## The RGB encoder", "",
              f"SimMIM, {pre['steps']} steps of 32 crops ({pre['images_seen']:,} images), "
              f"{pre['minutes']:.1f} min: masked-patch L1 {pre['first_loss']:.3f} -> "
              f"{pre['last_loss']:.3f}; held out {pre['held_out_loss']:.3f} (predicting the mean: "
              f"{pre['held_out_loss_of_predicting_the_mean']:.3f}).", "",
              "| encoder | probe, block 1 | probe, block 5 | ‖x‖ per block | ‖δ_RGB‖/‖x‖ per block |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name in ("pretrained", "random"):
        probe = quality["probe"][name]
        orient = quality["orientation_probe"][name]
        norms = quality["norms"][name]
        last = f"block {DEPTH - 1}"
        lines.append(f"| {name} | {probe['block 1']:.1f} % ({orient['block 1']:.1f} %) | "
                     f"{probe[last]:.1f} % ({orient[last]:.1f} %) | "
                     + " / ".join(f"{r['x']:.1f}" for r in norms) + " | "
                     + " / ".join(f"{100 * r['delta_rgb_over_x']:.1f} %" for r in norms) + " |")  # fmt: skip
    lines += ["", "Probes: ridge classifiers on frozen patch tokens, trained on training tiles, "
              "accuracy on test tiles: rededge_subclass's RGB classes (water, vegetation, bare) "
              "and, in brackets, the orientation of stripes (4 classes, chance 25 %).", "",
              "## What DEFLECT's spectral stream let through (seed 0, largest training set, "
              "encoder lr scale as chosen for the family)", "",
              "| run | ‖δ_RGB‖/‖x‖ | added/‖x‖ | angle(δ_uAtt, δ_RGB) | linear probe per "
              "output level (%) | ‖∇ UPE‖ |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, d in diagnostics.items():
        lines.append(
            f"| {name} | " + " / ".join(f"{b['delta_rgb'] / b['x']:.3f}" for b in d["blocks"])
            + " | " + " / ".join(f"{b['added_over_x']:.3f}" for b in d["blocks"])
            + " | " + " / ".join(f"{b['angle_deg']:.0f}°" for b in d["blocks"])
            + " | " + " / ".join(f"{v:.1f}" for v in d["probe"])
            + f" | {d['grad_upe']:.2g} |")  # fmt: skip
    lines += ["", "Time (min): " + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items()), ""]
    return "\n".join(lines)


def draw(out: Path, scale: Scale, table: dict[str, Contestant], oracles: dict) -> Path:
    """``study.png``: test mIoU against training tiles per task, one line per method with its
    95 % interval, the two oracles as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deflect.compare import summarise

    fig, axes = plt.subplots(1, len(scale.tasks), figsize=(6 * len(scale.tasks), 5.2), dpi=120,
                             squeeze=False)  # fmt: skip
    methods = list(dict.fromkeys(c.method for c in table.values()))
    for ax, task in zip(axes[0], scale.tasks):
        for i, method in enumerate(methods):
            xs, ys, los, his = [], [], [], []
            for n, *_ in scale.sizes:
                item = next((c for c in table.values() if (c.task, c.tiles, c.method) ==
                             (task, n, method)), None)  # fmt: skip
                if item and item.test:
                    s = summarise(list(item.test.values()))
                    xs.append(n * (1 + 0.02 * (i - len(methods) / 2)))
                    ys.append(s.mean), los.append(s.mean - s.lo), his.append(s.hi - s.mean)
            others = [m for m in methods if m != "deflect"]
            style = ({"color": "C3", "linewidth": 2.5} if method == "deflect"
                     else {"color": ["C0", "C1", "C2", "C4", "C5", "C6"][others.index(method) % 6]})  # fmt: skip
            ax.errorbar(xs, ys, yerr=[los, his], marker="o", capsize=3,
                        label=LABELS.get(method, method), **style)  # fmt: skip
        for key, colour in (("pixel", "k"), ("patch", "grey")):
            ax.axhline(oracles[task][key], color=colour, linestyle="--", linewidth=1,
                       label=f"{key} oracle")  # fmt: skip
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([n for n, *_ in scale.sizes], [str(n) for n, *_ in scale.sizes])
        ax.set_xlabel("training tiles")
        ax.set_ylabel("test mIoU (%)")
        ax.set_title(task)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path = out / "study.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("work_dirs/spectral_study"))
    parser.add_argument("--quick", action="store_true", help="a few minutes: tiny sizes")
    parser.add_argument("--jobs", type=int, default=None,
                        help="jobs at once on this machine (Hydra's joblib launcher); default: "
                             "the CPU count, 1 under --quick")  # fmt: skip
    parser.add_argument("--launcher", nargs="+", default=None,
                        help="Hydra launcher overrides for both sweeps, e.g. "
                             "hydra/launcher=submitit_slurm hydra.launcher.partition=cpu")  # fmt: skip
    args = parser.parse_args(argv)
    scale = SCALES["quick" if args.quick else "default"]
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs or (1 if args.quick else os.cpu_count() or 1)
    launcher = args.launcher if args.launcher is not None else default_launcher(jobs)
    start = time.time()
    minutes: dict[str, float] = {}

    def log(text: str) -> None:
        print(f"[{(time.time() - start) / 60:5.1f} min] {text}", flush=True)

    log(f"study in {out} (sweep logs: {out / 'study.log'})")
    folders = {task: write_task(out / "data", task, scale) for task in scale.tasks}
    oracles = {}
    for task, folder in folders.items():
        test = read_split(folder, "test")
        k = len(task_classes(task))
        oracles[task] = {
            "pixel": pixel_oracle(task, scale, test),
            "patch": patch_oracle(test[1], k),
        }
        log(f"{task}: per-pixel oracle {oracles[task]['pixel']:.1f}, patch oracle "
            f"{oracles[task]['patch']:.1f}")  # fmt: skip
    checkpoint = pretrain_rgb_encoder(out, scale, log)
    quality = encoder_quality(out, scale, folders["rededge_subclass"])
    minutes["data, oracles, pretraining"] = (time.time() - start) / 60
    log(f"encoder: probe {quality['probe']}")
    write_configs(out, scale, folders)
    t = time.time()
    stage1_dir = stage1(out, scale, launcher, checkpoint, log)
    minutes["stage 1"] = (time.time() - t) / 60
    chosen, _ = select(out, stage1_dir, scale)
    table = contestants(chosen, stage1_dir)
    t = time.time()
    stage2_dir = stage2(out, scale, launcher, checkpoint, list(chosen), log)
    minutes["stage 2"] = (time.time() - t) / 60
    collect_stage2(stage2_dir, table)
    t = time.time()
    diagnostics = {}
    largest = scale.sizes[-1][0]
    for task in scale.tasks:
        deflect = next(c for c in table.values() if (c.task, c.tiles, c.method) ==
                       (task, largest, "deflect"))  # fmt: skip
        lr = deflect.chosen.get("encoder_lr_scale")
        for folder in sorted(p for p in stage1_dir.iterdir() if (p / "metrics.json").is_file()):
            s = job_settings(folder)
            if (s.get("+study") == size_name(task, largest) and s.get("finetune") in
                    DEFLECT_FAMILY and (lr is None or s.get("encoder_lr_scale") == str(lr))):  # fmt: skip
                diagnostics[f"{task} / {s['finetune']}"] = diagnose(folder)
    minutes["diagnostics"] = (time.time() - t) / 60
    minutes["all"] = (time.time() - start) / 60
    results = {name: {"task": c.task, "tiles": c.tiles, "method": c.method, "chosen": c.chosen,
                      "validation": c.validation, "test": c.test, "trainable": c.trainable,
                      "candidates": c.candidates} for name, c in table.items()}  # fmt: skip
    (out / "study.json").write_text(json.dumps(
        {"oracles": oracles, "encoder": quality, "results": results, "minutes": minutes},
        indent=1))  # fmt: skip
    (out / "diagnostics.json").write_text(json.dumps(diagnostics, indent=1))
    text = report(out, scale, table, oracles, quality, diagnostics, minutes)
    (out / "study.md").write_text(text)
    picture = draw(out, scale, table, oracles)
    print(text)
    log(f"wrote {out / 'study.md'}, {out / 'study.json'}, {out / 'diagnostics.json'}, {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
