"""Training throughput and peak memory of encoder x fine-tuning method on this device.

    python scripts/benchmark.py --encoder vit_s16 vit_b16 --finetune frozen full deflect \
        --batch-size 8 --img-size 224

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
    if args.bands:
        bands = args.bands.split(",")
        stats = ",".join(f"{b}:0.1" for b in bands)
        overrides += [f"dataset.bands=[{','.join(bands)}]", "dataset.reflectance_scale=1",
                      f"dataset.band_stats.mean={{{stats}}}", f"dataset.band_stats.std={{{stats}}}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))  # fmt: skip
    bands = list(cfg.dataset.bands)
    data = DataSpec(  # what the dataset would describe, without reading it
        bands=tuple(bands),
        mean=dict(cfg.dataset.band_stats.mean),
        std=dict(cfg.dataset.band_stats.std),
        reflectance_scale=float(cfg.dataset.reflectance_scale),
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
    parser.add_argument(
        "--single", nargs=2, metavar=("ENCODER", "FINETUNE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
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
