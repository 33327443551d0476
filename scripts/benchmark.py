"""Training throughput and peak memory of encoder x fine-tuning method on this device.

    python scripts/benchmark.py --encoder vit_s16 vit_b16 --finetune frozen full deflect \
        --batch-size 8 --img-size 224
    python scripts/benchmark.py --loader mados --root /data/MADOS --workers 0 2 4 \
        --encoder vit_s16 --finetune deflect      # does loading keep pace with training?

Each (encoder, finetune) pair runs in a fresh subprocess so its peak memory is its own: CUDA
``max_memory_allocated`` on a GPU, the process's peak resident set size (``ru_maxrss``) on CPU.
A step is forward + loss + backward + AdamW step, built by the same code as ``run.py``
(the demo dataset's bands unless ``--bands`` is given; inputs are random).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(args: argparse.Namespace, encoder: str, finetune: str) -> dict:
    """Time ``args.steps`` training steps after ``args.warmup`` untimed ones."""
    import torch
    from hydra import compose, initialize_config_dir

    from deflect.data import DataSpec
    from deflect.engine import build
    from deflect.engine.evaluator import autocast_context

    overrides = [
        f"encoder={encoder}", f"finetune={finetune}", f"img_size={args.img_size}",
        f"segmentor.channels={args.channels}",
    ]  # fmt: skip
    if args.loader:  # the model for that dataset's bands and statistics
        overrides.append(f"dataset={args.loader}")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))  # fmt: skip
    if args.bands and not args.loader:
        bands = args.bands.split(",")
        mean = std = dict.fromkeys(bands, 0.1)
        scale = 1.0
    else:
        bands = list(cfg.dataset.bands)
        mean, std = dict(cfg.dataset.band_stats.mean), dict(cfg.dataset.band_stats.std)
        scale = float(cfg.dataset.reflectance_scale)
    data = DataSpec(  # what the dataset would describe, without reading it
        bands=tuple(bands),
        mean={b: mean[b] for b in bands},
        std={b: std[b] for b in bands},
        reflectance_scale=scale,
        classes=("a", "b", "c", "d"),
    )
    model = build.build_model(cfg, data).to(device).train()
    optimizer = build.build_optimizer(cfg, model)
    loss_fn = build.build_loss(cfg, data).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    images = torch.randn(args.batch_size, len(bands), args.img_size, args.img_size, device=device)
    masks = torch.randint(0, 4, (args.batch_size, args.img_size, args.img_size), device=device)

    def step() -> None:
        with autocast_context(device, args.precision):
            logits = model(images)
        loss = loss_fn(logits, masks)
        aux = model.auxiliary_losses()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss + sum(aux.values()) if aux else loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    counts = build.parameter_counts(model)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "encoder": encoder,
        "finetune": finetune,
        "device": str(device),
        "precision": args.precision,
        "batch": args.batch_size,
        "img_size": args.img_size,
        "images_per_s": args.steps * args.batch_size / seconds,
        "peak_mem_mib": peak_mib,
        "encoder_trainable": counts["encoder_trainable"],
        "encoder_trainable_percent": counts["encoder_trainable_percent"],
        "decoder_trainable": counts["decoder_trainable"],
    }


def measure_loader(args: argparse.Namespace, workers: int) -> dict:
    """Training images per second the data pipeline delivers (read, crop, augment, normalise,
    collate) with ``workers`` loader processes, after one warm-up batch."""
    import torch
    from hydra import compose, initialize_config_dir

    from deflect.engine import build
    from deflect.engine.distributed import DistInfo

    overrides = [f"dataset={args.loader}", f"img_size={args.img_size}",
                 f"batch_size={args.batch_size}", f"num_workers={workers}"]  # fmt: skip
    if args.root:
        overrides.append(f"dataset.root={args.root}")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    dataset = build.build_dataset(cfg, "train")
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    loader = build.build_loader(dataset, cfg, info, train=True, generator=torch.Generator())
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    start, images, restarts = time.perf_counter(), 0, 0
    for _ in range(args.steps):
        try:
            images += next(batches)["image"].shape[0]
        except StopIteration:  # a small split: a new epoch (workers start again)
            batches, restarts = iter(loader), restarts + 1
            images += next(batches)["image"].shape[0]
    return {"dataset": args.loader, "workers": workers, "samples": len(dataset),
            "restarts": restarts,
            "loader_images_per_s": images / (time.perf_counter() - start)}  # fmt: skip


def main() -> None:
    """Parse arguments; run each pair in a subprocess (or measure one with --single)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--encoder", nargs="+", default=["vit_s16"])
    parser.add_argument("--finetune", nargs="+", default=["frozen", "full"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=512, help="UperNet width")
    parser.add_argument("--bands", default="", help="comma-separated band names (default: demo's)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loader", default="", help="also time this dataset's training loader")
    parser.add_argument("--root", default="", help="its dataset.root")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="loader workers")
    parser.add_argument(
        "--single", nargs=2, metavar=("ENCODER", "FINETUNE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.loader and not args.single:
        for workers in args.workers:
            r = measure_loader(args, workers)
            note = f"  ({r['restarts']} epoch restarts included)" if r["restarts"] else ""
            print(f"loader {r['dataset']} ({r['samples']} training samples), {workers} workers: "
                  f"{r['loader_images_per_s']:8.2f} img/s{note}", flush=True)  # fmt: skip
    if args.single:
        import warnings

        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        print(json.dumps(measure(args, *args.single)))
        return
    passthrough = [a for a in sys.argv[1:]]
    rows = []
    for encoder in args.encoder:
        for finetune in args.finetune:
            cmd = [sys.executable, __file__, *passthrough, "--single", encoder, finetune]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{encoder} {finetune}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{encoder:8s} {finetune:8s} {r['device']:6s} {r['precision']}  "
                  f"{r['images_per_s']:8.2f} img/s  peak {r['peak_mem_mib']:8.0f} MiB  "
                  f"encoder trainable {r['encoder_trainable']:>11,} "
                  f"({r['encoder_trainable_percent']:.3f}%)", flush=True)  # fmt: skip
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
