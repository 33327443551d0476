r"""Does DEFLECT earn its place? A reproducible study on planted spectral tasks.

    python scripts/spectral_study.py                  # the default study (under an hour, 2 cores)
    python scripts/spectral_study.py --quick          # a few minutes: the pipeline end to end
    python scripts/spectral_study.py --tasks spectral_only --arms deflect deflect_none --seeds 0 1

What it does, all of it written under ``--out`` (default ``work_dirs/spectral_study``):

1. **Planted tasks**, written as GeoTIFF folders in ``dataset=folder``'s layout (7 Sentinel-2
   bands B2, B3, B4, B5, B8A, B11, B12 as float reflectance; regions of a random class map, each
   region one spectrum plus per-pixel noise):

   * ``spectral_only``: 3 classes whose RGB statistics are identical; they differ only in NIR and
     SWIR (RGB carries no signal at all);
   * ``rededge_subclass`` (the realistic case): water, vegetation and bare soil, separable in RGB,
     with vegetation split into healthy and stressed, which differ only in red edge and NIR;
   * ``index_threshold``: classes defined by an NDVI threshold (< 0.25, 0.25-0.5, >= 0.5) on regions
     whose red and NIR reflectances are drawn independently, so RGB alone cannot tell them apart.

2. **An RGB-pretrained encoder.** No weights can be downloaded here, so the script pretrains one:
   a ViT (width 96, depth 6, 3 heads, patch 8) trained with UperNet, every parameter, on an RGB-only
   task it also generates (colour and texture classes, bands B4, B3, B2 only). Its encoder weights
   are saved as ``rgb_vit.pth`` and every arm starts from them (``encoder.checkpoint``).

3. **The arms**, each a ``run.py -m`` multirun over the seeds, per task: DEFLECT's options
   (``deflection`` hard / soft / none, target blocks, rank, ...), the simplest spectral baselines
   (``spectral_kernel``: the frozen encoder with a trained all-band patch kernel; LoRA and BitFit
   with ``band_strategy=rgb_random``), the RGB-only ``frozen`` encoder, and ``full`` fine-tuning.

4. **The table and the plot**: ``scripts/ablation_table.py`` over each task's sweeps (mean ±
   std over seeds), and ``study.md`` / ``study.png`` over all tasks: test mIoU per arm and task,
   and the trainable parameters of the encoder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BANDS = ["B2", "B3", "B4", "B5", "B8A", "B11", "B12"]
RGB = ["B4", "B3", "B2"]
SPLIT_TILES = {"train": 1.0, "val": 0.25, "test": 0.25}  # tiles per split, as fractions of train

# ---- the encoder every arm shares ------------------------------------------------------------------
ENCODER = [
    "encoder=tiny_vit",
    "encoder.arch_kwargs={embed_dim:96,depth:6,num_heads:3}",
    "encoder.output_layers=[1,3,4,5]",
    "segmentor.channels=64",
]


@dataclass(frozen=True)
class Size:
    """How big the study is."""

    tile: int  # pixels a side
    train_tiles: int
    epochs: int
    pretrain_epochs: int
    seeds: tuple[int, ...]


SIZES = {
    "default": Size(tile=64, train_tiles=48, epochs=30, pretrain_epochs=30, seeds=(0, 1, 2)),
    "quick": Size(tile=32, train_tiles=8, epochs=2, pretrain_epochs=2, seeds=(0,)),
}

#: arm name -> run.py overrides (on top of the shared ones)
ARMS: dict[str, list[str]] = {
    "frozen": ["finetune=frozen"],
    "spectral_kernel": ["finetune=spectral_kernel"],
    "lora_rgb_random": ["finetune=lora", "finetune.rank=4", "finetune.band_strategy=rgb_random"],
    "bitfit_rgb_random": ["finetune=bitfit", "finetune.band_strategy=rgb_random"],
    "full": ["finetune=full", "finetune.band_strategy=rgb_random"],
    "deflect_hard": ["finetune=deflect", "finetune.deflection=hard"],
    "deflect_soft": ["finetune=deflect", "finetune.deflection=soft"],
    "deflect_none": ["finetune=deflect", "finetune.deflection=none"],
    "deflect_embedding": ["finetune=deflect", "finetune.deflection=embedding"],
    "deflect_hard_all_blocks": [
        "finetune=deflect",
        "finetune.deflection=hard",
        "finetune.target_blocks=[0,1,2,3,4,5]",
    ],  # fmt: skip
}
QUICK_ARMS = ["frozen", "spectral_kernel", "deflect_hard", "deflect_embedding"]
#: Every arm: the decoder at 1e-3; encoder parameters that start at zero or at random (adapters,
#: kernels) at 10x that, full fine-tuning's pretrained weights at 0.1x.
COMMON_LR = ["optimizer.lr=1e-3"]
ENCODER_LR = {"frozen": [], "full": ["encoder_lr_scale=0.1"]}
ADAPTER_LR = ["encoder_lr_scale=10"]


# ---- planted tasks ---------------------------------------------------------------------------------
def class_map(rng: np.random.Generator, size: int, classes: int, regions: int = 6) -> np.ndarray:
    """A map of ``regions`` Voronoi cells (jittered borders), each given a random class, with
    every class present when ``regions >= classes``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    centres = rng.uniform(0, size, (regions, 2))
    jitter = rng.normal(0, size / 16, (2, size, size))
    d = ((ys[None] + jitter[0] - centres[:, 0, None, None]) ** 2
         + (xs[None] + jitter[1] - centres[:, 1, None, None]) ** 2)  # fmt: skip
    cell = d.argmin(axis=0)
    labels = np.concatenate([rng.permutation(classes), rng.integers(0, classes, regions)])
    return labels[:regions][cell]


# Mean reflectance per class and band (B2, B3, B4, B5, B8A, B11, B12).
SPECTRA = {
    "spectral_only": {
        "classes": ["nir_high", "swir_high", "both_low"],
        "means": [
            [0.08, 0.10, 0.12, 0.16, 0.40, 0.20, 0.12],
            [0.08, 0.10, 0.12, 0.16, 0.22, 0.36, 0.26],
            [0.08, 0.10, 0.12, 0.16, 0.22, 0.20, 0.12],
        ],
    },
    "rededge_subclass": {
        "classes": ["water", "healthy_vegetation", "stressed_vegetation", "bare_soil"],
        "means": [
            [0.07, 0.06, 0.04, 0.03, 0.02, 0.01, 0.01],
            [0.04, 0.08, 0.05, 0.14, 0.42, 0.22, 0.11],
            [0.04, 0.08, 0.05, 0.10, 0.26, 0.22, 0.11],
            [0.12, 0.15, 0.19, 0.22, 0.26, 0.32, 0.27],
        ],
    },
}
NDVI_EDGES = (0.25, 0.5)


def planted_tile(task: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One tile of ``task``: reflectance ``(7, size, size)`` float32 and its class mask."""
    if task == "index_threshold":
        regions = 8
        cells = class_map(rng, size, regions, regions)  # each cell its own region
        red = rng.uniform(0.03, 0.15, regions)
        nir = rng.uniform(0.05, 0.45, regions)
        ndvi = (nir - red) / (nir + red)
        labels = np.digitize(ndvi, NDVI_EDGES)  # 0: < 0.25, 1: 0.25-0.5, 2: >= 0.5
        means = np.stack([red * 0.7, red * 0.9, red, red * 1.2 + 0.02, nir, 0.5 * nir + 0.05,
                          0.3 * nir + 0.03], axis=1)  # (regions, 7)  # fmt: skip
        image = means[cells].transpose(2, 0, 1)
        mask = labels[cells]
    else:
        spec = SPECTRA[task]
        mask = class_map(rng, size, len(spec["classes"]))
        image = np.asarray(spec["means"])[mask].transpose(2, 0, 1)
    gain = rng.uniform(0.9, 1.1)  # illumination, per tile
    noise = rng.normal(0, 0.015, image.shape)
    return np.clip(image * gain + noise, 0.001, 1).astype(np.float32), mask.astype(np.uint8)


def task_classes(task: str) -> list[str]:
    if task == "index_threshold":
        return ["ndvi_low", "ndvi_mid", "ndvi_high"]
    return SPECTRA[task]["classes"]


def rgb_pretraining_tile(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB-only tile (B2, B3, B4) of 5 colour/texture classes, for the encoder's pretraining."""
    mask = class_map(rng, size, 5, 7)
    colours = np.array(
        [
            [0.05, 0.08, 0.04],
            [0.10, 0.10, 0.10],
            [0.04, 0.06, 0.12],
            [0.15, 0.12, 0.08],
            [0.08, 0.08, 0.08],
        ]
    )  # fmt: skip  (B2, B3, B4)
    image = colours[mask].transpose(2, 0, 1)
    ys, xs = np.mgrid[0:size, 0:size]
    stripes = 0.04 * np.sin(xs / 1.5)[None] * (mask == 4)[None]  # class 4: texture only
    image = image + stripes + rng.normal(0, 0.01, image.shape)
    return np.clip(image, 0.001, 1).astype(np.float32), mask.astype(np.uint8)


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


def write_task(root: Path, task: str, size: Size, seed: int = 0) -> Path:
    """``<root>/<task>/{train,val,test}/<n>_image.tif + _mask.tif`` (skipped when present)."""
    folder = root / task
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, fraction in SPLIT_TILES.items():
        for i in range(max(2, round(fraction * size.train_tiles))):
            if task == "rgb_pretraining":
                image, mask = rgb_pretraining_tile(rng, size.tile)
                names = ["B2", "B3", "B4"]
            else:
                image, mask = planted_tile(task, rng, size.tile)
                names = BANDS
            write_geotiff(folder / split / f"t{i:03d}_image.tif", image, names)
            write_geotiff(folder / split / f"t{i:03d}_mask.tif", mask)
    (folder / "done").write_text("")
    return folder


# ---- running ---------------------------------------------------------------------------------------
def run(args: list[str], cwd: Path, log: Path) -> None:
    """``run.py`` with ``args``; its output goes to ``log``; a failure stops the study."""
    cmd = [sys.executable, str(REPO / "run.py"), *args]
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"run.py failed ({proc.returncode}); see {log}")


def dataset_args(folder: Path, classes: list[str]) -> list[str]:
    return ["dataset=folder", f"dataset.root={folder}", f"dataset.classes=[{','.join(classes)}]",
            "dataset.ignore_index=255", "dataset.reflectance_scale=1"]  # fmt: skip


def pretrain_rgb_encoder(out: Path, size: Size, log: Path) -> Path:
    """Train ViT + UperNet, every parameter, on the RGB pretraining task; save the encoder's
    weights in timm's key names as ``rgb_vit.pth``."""
    import torch

    path = out / "rgb_vit.pth"
    if path.is_file():
        return path
    data = write_task(out / "data", "rgb_pretraining", size)
    work = out / "pretraining"
    shutil.rmtree(work, ignore_errors=True)
    run([*ENCODER, *dataset_args(data, [f"c{i}" for i in range(5)]), "finetune=full",
         f"img_size={size.tile}", f"epochs={size.pretrain_epochs}", "optimizer.lr=1e-3",
         "batch_size=8", "num_workers=0", "save_predictions=false", "num_vis=0",
         f"work_dir={work}"], out, log)  # fmt: skip
    state = torch.load(work / "checkpoints" / "best.pt", weights_only=True)["model"]
    prefix = "encoder.base_model.backbone."
    vit = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    torch.save(vit, path)
    return path


def sweep_arm(out: Path, task: str, arm: str, size: Size, checkpoint: Path, log: Path) -> Path:
    """One arm on one task, over the seeds: a ``run.py -m`` multirun in its own sweep folder."""
    sweep = out / "sweeps" / task / arm
    if (
        sweep.is_dir()
        and all((p / "metrics.json").is_file() for p in sweep.iterdir() if p.is_dir())
        and len([p for p in sweep.iterdir() if p.is_dir()]) == len(size.seeds)
    ):
        return sweep
    data = write_task(out / "data", task, size)
    extra = COMMON_LR + ENCODER_LR.get(arm, ADAPTER_LR)
    run(["-m", *ENCODER, *dataset_args(data, task_classes(task)), *ARMS[arm], *extra,
         f"encoder.checkpoint={checkpoint}", f"img_size={size.tile}", f"epochs={size.epochs}",
         "batch_size=8", "num_workers=0", "save_predictions=false", "num_vis=0",
         f"seed={','.join(str(s) for s in size.seeds)}", f"hydra.sweep.dir={sweep}",
         "resume=true"], out, log)  # fmt: skip
    return sweep


def ablation_table():
    """``scripts/ablation_table.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablation_table", REPO / "scripts" /
                                                  "ablation_table.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---- why: what the deflection lets through --------------------------------------------------------
def diagnose(run_dir: Path) -> dict:
    """What a trained DEFLECT run's spectral stream does, on its test split.

    Per target block (medians over tokens): the norm of the tokens entering it ‖x‖, of the
    frozen attention update ‖δ_RGB‖, of the untangled one ‖δ_uAtt‖ and of the update actually
    added, the angle between δ_uAtt and δ_RGB, and the added update relative to ‖x‖. Per output
    level of the encoder (what the decoder reads): the class separability of the patch tokens
    (Fisher ratio: between-class over within-class variance, patches labelled by their majority
    class). And the gradient norm that reaches UPE's projection on one training batch.
    """
    import torch

    from deflect.engine import build
    from deflect.predict import load_predictor
    from deflect.tuners.deflect import layer as deflect_layer

    predictor = load_predictor(run_dir, device="cpu")
    model = predictor.model
    cfg = __import__("omegaconf").OmegaConf.load(run_dir / "config.yaml")
    test = build.build_dataset(cfg, "test")
    records: list[dict] = []
    update, embedding = deflect_layer.deflect_update, deflect_layer.deflect_embedding

    def record_update(delta_uatt, delta_rgb, mode="hard", eps=1e-6):
        out = update(delta_uatt, delta_rgb, mode, eps)
        records.append({"uatt": delta_uatt, "rgb": delta_rgb, "added": out})
        return out

    def record_embedding(x, delta_uatt, delta_rgb, eps=1e-6):
        out = embedding(x, delta_uatt, delta_rgb, eps)
        records[-1]["added"] = out
        return out

    inputs: list[torch.Tensor] = []
    blocks = model.encoder.base_model.vit.blocks
    targets = [i for i, b in enumerate(blocks) if getattr(b, "deflect_uatt", None)]
    hooks = [blocks[i].register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
             for i in targets]  # fmt: skip
    deflect_layer.deflect_update = record_update
    deflect_layer.deflect_embedding = record_embedding
    features: list[list[torch.Tensor]] = []
    labels: list[torch.Tensor] = []
    patch = model.encoder.base_model.patch_size
    try:
        with torch.no_grad():
            for i in range(len(test)):
                sample = test[i]
                x = sample["image"][None]
                features.append(model.encoder(x))
                mask = sample["mask"]  # majority class per patch
                h, w = mask.shape[0] // patch, mask.shape[1] // patch
                tiles = mask[: h * patch, : w * patch].reshape(h, patch, w, patch)
                tiles = tiles.permute(0, 2, 1, 3).reshape(h * w, -1)
                labels.append(torch.mode(tiles, dim=1).values)
    finally:
        deflect_layer.deflect_update, deflect_layer.deflect_embedding = update, embedding
        for hook in hooks:
            hook.remove()
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
    y = torch.cat(labels)
    out["separability"] = []
    for level in range(len(features[0])):
        maps = torch.cat([f[level] for f in features])  # (N, D, H/p, W/p): the patch grid
        tokens = maps.flatten(2).transpose(1, 2).flatten(0, 1)  # (N·h·w, D), as y
        mean = tokens.mean(0)
        between = sum(((tokens[y == c].mean(0) - mean) ** 2).sum() * (y == c).sum()
                      for c in y.unique())  # fmt: skip
        within = sum(((tokens[y == c] - tokens[y == c].mean(0)) ** 2).sum() for c in y.unique())
        out["separability"].append(float(between / within))
    model.train()
    train = build.build_dataset(cfg, "train")
    batch = torch.stack([train[i]["image"] for i in range(min(8, len(train)))])
    target = torch.stack([train[i]["mask"] for i in range(min(8, len(train)))])
    loss = torch.nn.functional.cross_entropy(model(batch), target, ignore_index=255)
    loss.backward()
    upe = model.encoder.base_model.vit.patch_embed.deflect_upe["default"]
    out["grad_upe"] = float(upe.projection.weight.grad.norm())
    return out


# ---- the summary -----------------------------------------------------------------------------------
def arm_results(sweep: Path) -> dict:
    """Test mIoU of each seed, and the encoder's trainable parameters."""
    values, trainable = [], None
    for folder in sorted(p for p in sweep.iterdir() if p.is_dir()):
        metrics = json.loads((folder / "metrics.json").read_text())
        values.append(100 * metrics["test"]["mIoU"])
        trainable = metrics["params"]["encoder_trainable"]
    return {"mIoU": values, "trainable": trainable}


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def summarise(out: Path, results: dict[str, dict[str, dict]], size: Size, seconds: float) -> str:
    """``study.md``: one row per arm, one column per task (test mIoU, mean ± std over seeds)."""
    tasks = list(results)
    arms = list(dict.fromkeys(a for t in tasks for a in results[t]))
    lines = [
        "# Spectral study",
        "",
        f"Tiles {size.tile} px, {size.train_tiles} training tiles, {size.epochs} epochs, seeds "
        f"{list(size.seeds)}; ViT width 96, depth 6, patch 8, pretrained here on RGB only; "
        f"UperNet-64. {seconds / 60:.1f} min in all. Test mIoU (%), mean ± std over seeds.",
        "",
        "| arm | overrides | trainable encoder parameters | " + " | ".join(tasks) + " |",
        "|---|---|---|" + "---|" * len(tasks),
    ]
    for arm in arms:
        trainable = next(results[t][arm]["trainable"] for t in tasks if arm in results[t])
        cells = [mean_std(results[t][arm]["mIoU"]) if arm in results[t] else "-" for t in tasks]
        lines.append(f"| {arm} | `{' '.join(ARMS[arm])}` | {trainable:,} | " + " | ".join(cells)
                     + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def diagnostics_table(diagnostics: dict[str, dict]) -> str:
    """What each DEFLECT arm's spectral stream did (seed 0): per target block, the added
    attention update relative to the token, and its angle to the frozen update; the class
    separability of what the decoder reads; the gradient reaching UPE."""
    lines = [
        "",
        "## What the spectral stream let through (seed 0, test split)",
        "",
        "| task / arm | ‖δ_RGB‖ / ‖x‖ per block | added update / ‖x‖ per block | angle(δ_uAtt, "
        "δ_RGB) per block | class separability of the encoder outputs | ‖∇ UPE‖ |",
        "|---|---|---|---|---|---|",
    ]
    for name, d in diagnostics.items():
        rgb = " / ".join(f"{b['delta_rgb'] / b['x']:.3f}" for b in d["blocks"])
        added = " / ".join(f"{b['added_over_x']:.3f}" for b in d["blocks"])
        angle = " / ".join(f"{b['angle_deg']:.0f}°" for b in d["blocks"])
        sep = " / ".join(f"{v:.3f}" for v in d["separability"])
        lines.append(f"| {name} | {rgb} | {added} | {angle} | {sep} | {d['grad_upe']:.2g} |")
    lines += [
        "",
        "Separability: between-class over within-class variance of the patch tokens at each "
        "output level (patches labelled by their majority class); 0 means the decoder gets no "
        "class information from the encoder. ‖∇ UPE‖: gradient norm on UPE's projection for one "
        "training batch of the trained model.",
    ]
    return "\n".join(lines) + "\n"


def draw(out: Path, results: dict[str, dict[str, dict]]) -> Path:
    """``study.png``: test mIoU per arm, one panel per task, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4.2), dpi=120,
                             squeeze=False)  # fmt: skip
    for ax, task in zip(axes[0], tasks):
        arms = list(results[task])
        for i, arm in enumerate(arms):
            values = results[task][arm]["mIoU"]
            colour = "C3" if arm.startswith("deflect") else "C0"
            ax.bar(i, statistics.mean(values), color=colour, alpha=0.6)
            ax.plot([i] * len(values), values, "k.", markersize=5)
        ax.set_xticks(range(len(arms)), arms, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(task, fontsize=10)
        ax.set_ylabel("test mIoU (%)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "study.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("work_dirs/spectral_study"))
    parser.add_argument("--quick", action="store_true", help="a few minutes, one seed, 4 arms")
    parser.add_argument("--tasks", nargs="+", default=["spectral_only", "rededge_subclass",
                                                       "index_threshold"])  # fmt: skip
    parser.add_argument("--arms", nargs="+", default=None, choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "default"]
    if args.seeds:
        size = Size(size.tile, size.train_tiles, size.epochs, size.pretrain_epochs,
                    tuple(args.seeds))  # fmt: skip
    arms = args.arms or (QUICK_ARMS if args.quick else list(ARMS))
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    start = time.time()
    print(f"study in {out} (log: {log})", flush=True)
    checkpoint = pretrain_rgb_encoder(out, size, log)
    print(f"RGB-pretrained encoder: {checkpoint} ({(time.time() - start) / 60:.1f} min)",
          flush=True)  # fmt: skip
    results: dict[str, dict[str, dict]] = {}
    for task in args.tasks:
        results[task] = {}
        for arm in arms:
            sweep = sweep_arm(out, task, arm, size, checkpoint, log)
            results[task][arm] = arm_results(sweep)
            print(f"{task:18s} {arm:20s} mIoU {mean_std(results[task][arm]['mIoU']):>12s}  "
                  f"({(time.time() - start) / 60:.1f} min)", flush=True)  # fmt: skip
    tables = []
    for task in args.tasks:  # scripts/ablation_table.py over the task's sweeps: table + Figure 1
        table = ablation_table()
        folder = out / "tables" / task
        with contextlib.redirect_stdout(io.StringIO()):
            table.main([*(str(out / "sweeps" / task / arm) for arm in arms), "--out", str(folder)])
        tables.append(folder / "results.md")
    diagnostics = {}
    for task in args.tasks:
        for arm in (a for a in arms if a.startswith("deflect")):
            first = sorted(p for p in (out / "sweeps" / task / arm).iterdir() if p.is_dir())[0]
            diagnostics[f"{task} / {arm}"] = diagnose(first)
    (out / "diagnostics.json").write_text(json.dumps(diagnostics, indent=1))
    text = summarise(out, results, size, time.time() - start) + diagnostics_table(diagnostics)
    (out / "study.md").write_text(text)
    (out / "study.json").write_text(json.dumps(results, indent=1))
    picture = draw(out, results)
    print(text)
    print(f"wrote {out / 'study.md'}, {out / 'study.json'} and {picture}; per task, the ablation "
          f"table and Figure 1: {', '.join(str(t) for t in tables)} (and results.png)")  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
