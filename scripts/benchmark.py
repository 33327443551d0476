r"""Training, evaluation and prediction throughput and peak memory of encoder x fine-tuning
method on this device.

    python scripts/benchmark.py --encoder vit_s16 vit_b16 --finetune frozen full deflect \
        --batch-size 8 --img-size 224
    python scripts/benchmark.py --loader mados --root /data/MADOS --workers 0 2 4 \
        --encoder vit_s16 --finetune deflect      # does loading keep pace with training?

Each (encoder, finetune) pair runs in a fresh subprocess so its peak memory is its own: CUDA
``max_memory_allocated`` on a GPU, the process's peak resident set size (``ru_maxrss``) on CPU.
A step is forward + loss + backward + AdamW step, built by the same code as ``run.py``
(the demo dataset's bands unless ``--bands`` is given; inputs are random).

Evaluation and prediction (``--mode eval`` / ``--mode predict``) time what ``run.py eval_dir=...``
and ``scripts/predict.py`` run: the evaluator's sliding window, argmax and confusion matrix over
``--eval-size`` images, or a ``--scene-size`` GeoTIFF scene read, predicted block by block and
written as a class map (reading and writing included)::

    python scripts/benchmark.py --mode eval --eval-size 512 --precision bf16 --batch-size 32
    python scripts/benchmark.py --mode predict --scene-size 4096 --precision bf16

Every mode prints the FLOPs of a step (``FlopCounterMode``), the TFLOP/s reached and, on a GPU
whose data-sheet peak is known (or with ``--peak-tflops``), the model FLOPs utilisation (MFU):
FLOPs per second over the dense peak of the precision (bf16/fp16 tensor cores; TF32 for fp32
at ``--matmul-precision high``; plain fp32 at ``highest``). With ``activation_checkpointing``
the recomputed forward is counted too.

Side by side with TerraTorch (``pip install -e .[bench]``; TerraTorch is never a dependency)::

    python scripts/benchmark.py --vs-terratorch --finetune frozen full deflect lora \
        --threads 2 --rounds 3

builds the same job in both: Prithvi-100M (ViT-B/16, 6 HLS bands, random weights), 224 px,
UperNet with 512 channels, cross-entropy, AdamW; ours is ``encoder=prithvi_100m`` with the
method, TerraTorch's is its ``EncoderDecoderFactory`` model (``prithvi_eo_v1_100``,
``SelectIndices`` [3, 5, 7, 11], ``ReshapeTokensToImage``, ``LearnedInterpolateToPyramidal``,
``UperNetDecoder``) with ``freeze_backbone`` for frozen and PEFT LoRA r16 on qkv, proj, fc1, fc2
for lora and deflect. Each measurement is a fresh process; the two alternate for ``--rounds``
rounds and the median images/s of each and their ratio are printed, with our step's phases
(encoder forward, neck + decoder forward, loss + backward, optimiser) and the FLOPs of a step.

Both sides run at one fp32 matmul precision (``--matmul-precision``, default ``highest``: true
fp32). Importing TerraTorch 1.2 lowers it to ``medium`` for the whole process (bf16 linear layers
on CPUs with avx512_bf16); the benchmark pins it back and says so. Ours uses the
``cpu_allocator`` of the config (``tuned``, as ``run.py``); ``--terratorch-allocator tuned``
gives TerraTorch the same. Memory is the peak resident size above the process's size just before
the model is built; ``first_step_s`` includes compilation under ``--set compile=true``.
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
    from deflect.engine.runtime import apply_runtime

    overrides = [
        f"encoder={encoder}", f"finetune={finetune}", f"img_size={args.img_size}",
        f"segmentor.channels={args.channels}",
    ]  # fmt: skip
    overrides.append(f"matmul_precision={args.matmul_precision}")
    overrides += list(args.set)  # e.g. segmentor.fast_fusion=false for the reference decoder
    if args.loader:  # the model for that dataset's bands and statistics
        overrides.append(f"dataset={args.loader}")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    apply_runtime(cfg)  # as run.py: matmul precision and the CPU allocator
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
    if args.threads:
        torch.set_num_threads(args.threads)
    rss_before_mib = current_rss_mib()
    model = build.build_model(cfg, data).to(device).train()
    counts = build.parameter_counts(model)
    row = {
        "mode": args.mode,
        "encoder": encoder,
        "finetune": finetune,
        "device": str(device),
        "device_name": device_name(device),
        "precision": args.precision,
        "batch": args.batch_size,
        "img_size": args.img_size,
        "encoder_trainable": counts["encoder_trainable"],
        "encoder_trainable_percent": counts["encoder_trainable_percent"],
        "decoder_trainable": counts["decoder_trainable"],
    }
    if args.mode == "eval":
        row.update(measure_eval(args, model, data, device))
    elif args.mode == "predict":
        row.update(measure_predict(args, model, data, device))
    else:
        row.update(measure_train(args, cfg, model, data, device))
    row["peak_mem_mib"] = peak_mem_mib(device, rss_before_mib)
    row.update(utilisation(row["flops"], row["seconds"], peak_tflops(args, device)))
    return row


def measure_train(args: argparse.Namespace, cfg, model, data, device) -> dict:
    """``args.steps`` training steps (forward + loss + backward + AdamW) after ``args.warmup``."""
    import torch

    from deflect.engine import build
    from deflect.engine.evaluator import autocast_context

    optimizer = build.build_optimizer(cfg, model)
    stepped = build.compile_if_asked(model, cfg)  # compile=true: what run.py trains
    loss_fn = build.build_loss(cfg, data).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    images = torch.randn(
        args.batch_size, len(data.bands), args.img_size, args.img_size, device=device
    )
    masks = torch.randint(0, 4, (args.batch_size, args.img_size, args.img_size), device=device)

    def step() -> None:
        with autocast_context(device, args.precision):
            logits = stepped(images)
        loss = loss_fn(logits, masks)
        aux = model.auxiliary_losses()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss + sum(aux.values()) if aux else loss).backward()
        scaler.step(optimizer)
        scaler.update()

    seconds, first = timed_steps(step, args, device)
    phases = step_phases(model, images, masks, loss_fn, optimizer, device, args.precision)
    flops = step_flops(step)
    return {
        "images_per_s": args.steps * args.batch_size / seconds,
        "first_step_s": first,  # includes compilation with compile=true
        "phases_s": phases,
        "gflop_per_step": flops / 1e9,
        "flops": flops * args.steps,
        "seconds": seconds,
    }


def measure_eval(args: argparse.Namespace, model, data, device) -> dict:
    """The evaluator over ``args.steps`` batches of ``--eval-size`` images (sliding window of
    the model's ``img_size``, argmax, confusion matrix), after ``args.warmup`` batches."""
    import torch

    from deflect.engine.distributed import DistInfo
    from deflect.engine.evaluator import Evaluator
    from deflect.tasks import InferenceSettings, SegmentationTask

    size = args.eval_size or args.img_size
    settings = InferenceSettings(args.img_size, args.eval_stride or None, args.precision)
    evaluator = Evaluator(SegmentationTask(), settings, data, DistInfo(0, 1, 0, device))
    batch = {
        "image": torch.randn(args.batch_size, len(data.bands), size, size, device=device),
        "mask": torch.randint(0, data.num_classes, (args.batch_size, size, size), device=device),
    }
    evaluator.evaluate(model, [batch] * max(args.warmup, 1), desc="warm-up")
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    evaluator.evaluate(model, [batch] * args.steps)
    _sync(device)
    seconds = time.perf_counter() - start
    flops = step_flops(lambda: evaluator.evaluate(model, [batch]))
    images = args.steps * args.batch_size
    return {
        "eval_size": size,
        "stride": settings.step,
        "images_per_s": images / seconds,
        "megapixels_per_s": images * size * size / seconds / 1e6,
        "gflop_per_step": flops / 1e9,
        "flops": flops * args.steps,
        "seconds": seconds,
    }


def measure_predict(args: argparse.Namespace, model, data, device) -> dict:
    """``scripts/predict.py`` on one random ``--scene-size`` GeoTIFF scene: reading, the
    sliding window block by block, the class map written (after a warm-up on a small scene)."""
    import tempfile

    import torch

    from deflect.engine.evaluator import autocast_context
    from deflect.predict import Predictor, predict_scenes
    from deflect.tasks import InferenceSettings

    model.eval()
    window = args.img_size
    stride = InferenceSettings(window, args.eval_stride or None).step  # the run's default
    predictor = Predictor(model, data, window, stride, device, args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = write_scene(tmp / "warmup.tif", data, 2 * window)
        scene = write_scene(tmp / "scene.tif", data, args.scene_size)
        predict_scenes(predictor, [small], tmp / "out", args.batch_size, progress=False)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = predict_scenes(predictor, [scene], tmp / "out", args.batch_size, progress=False)
        _sync(device)
        seconds = time.perf_counter() - start
    forwards = out[0].forwards
    tile = torch.randn(args.batch_size, len(data.bands), window, window, device=device)
    with torch.no_grad(), autocast_context(device, args.precision):
        per_tile = step_flops(lambda: model(tile)) / args.batch_size
    return {
        "scene_size": args.scene_size,
        "stride": stride,
        "tiles": forwards,
        "megapixels_per_s": args.scene_size**2 / seconds / 1e6,
        "tiles_per_s": forwards / seconds,
        "gflop_per_step": per_tile * args.batch_size / 1e9,
        "flops": per_tile * forwards,
        "seconds": seconds,
    }


def write_scene(path: Path, data, size: int) -> Path:
    """A ``size`` x ``size`` float32 GeoTIFF of ``data``'s bands (named in the band
    descriptions), values drawn around the band statistics, in UTM 33N at 10 m."""
    import numpy as np
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(0)
    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": len(data.bands),
        "dtype": "float32", "crs": "EPSG:32633", "transform": Affine(10, 0, 500000, 0, -10, 5000000),
        "tiled": True, "blockxsize": 256, "blockysize": 256,
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        for i, band in enumerate(data.bands, start=1):
            values = data.mean[band] + data.std[band] * rng.standard_normal((size, size))
            dst.write(values.astype(np.float32), i)
            dst.set_band_description(i, band)
    return path


#: Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets: (half = bf16/fp16 tensor cores,
#: tf32, fp32), matched on ``torch.cuda.get_device_name`` in this order.
PEAK_TFLOPS = (
    ("H200", (989.4, 494.7, 66.9)),
    ("H100 PCIe", (756.5, 378.0, 51.2)),
    ("H100 NVL", (835.5, 417.5, 60.0)),
    ("H100", (989.4, 494.7, 66.9)),  # SXM
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.05, 183.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
)


def peak_tflops_of(name: str, precision: str, matmul_precision: str) -> float | None:
    """The data-sheet dense peak of GPU ``name`` for a step in ``precision`` (fp32 runs on TF32
    tensor cores unless ``matmul_precision`` is ``highest``); None for a GPU not listed."""
    for key, (half, tf32, fp32) in PEAK_TFLOPS:
        if key.lower() in name.lower():
            if precision in ("bf16", "fp16"):
                return half
            return fp32 if matmul_precision == "highest" else tf32
    return None


def peak_tflops(args: argparse.Namespace, device) -> float | None:
    """``--peak-tflops``, else the data-sheet peak of this GPU, else None (CPUs)."""
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    return peak_tflops_of(device_name(device), args.precision, args.matmul_precision)


def device_name(device) -> str:
    """The GPU's name, or the CPU's model name."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def utilisation(flops: float, seconds: float, peak: float | None) -> dict:
    """TFLOP/s reached and, with a peak, the model FLOPs utilisation."""
    achieved = flops / seconds / 1e12
    return {
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
    }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def current_rss_mib() -> float:
    """This process's resident memory now (Linux), 0 where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * resource.getpagesize() / 2**20


def peak_mem_mib(device, rss_before_mib: float) -> float:
    """Peak memory of the measurement: CUDA's peak allocation on a GPU, else the peak resident
    size above ``rss_before_mib``."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_above_mib(rss_before_mib)


def peak_rss_above_mib(before_mib: float) -> float:
    """This process's peak resident memory (``ru_maxrss``) above ``before_mib``."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before_mib


def timed_steps(step, args: argparse.Namespace, device) -> tuple[float, float]:
    """Seconds of ``args.steps`` calls of ``step`` after ``args.warmup`` untimed ones (the CUDA
    peak-memory counter starts after the warm-up), and the seconds of the first call."""
    import torch

    start, first = time.perf_counter(), float("nan")
    for i in range(args.warmup):
        step()
        if i == 0:
            _sync(device)
            first = time.perf_counter() - start
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return time.perf_counter() - start, first


def step_phases(model, images, masks, loss_fn, optimizer, device, precision) -> dict:
    """Seconds of one training step by phase: encoder forward, neck + decoder forward (with
    the final upsampling), loss + backward, optimiser step."""
    import torch.nn.functional as F

    from deflect.engine.evaluator import autocast_context

    times, clock = {}, time.perf_counter
    _sync(device)
    start = clock()
    with autocast_context(device, precision):
        features = model.encoder.forward_features(images)
        _sync(device)
        times["encoder_forward"], start = clock() - start, clock()
        logits = model.decode_head(model.neck(features))
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        _sync(device)
        times["neck_decoder_forward"], start = clock() - start, clock()
    loss = loss_fn(logits, masks)
    aux = model.auxiliary_losses()
    optimizer.zero_grad(set_to_none=True)
    (loss + sum(aux.values()) if aux else loss).backward()
    _sync(device)
    times["loss_backward"], start = clock() - start, clock()
    optimizer.step()
    _sync(device)
    times["optimizer"] = clock() - start
    return {k: round(v, 3) for k, v in times.items()}


def step_flops(step) -> float:
    """FLOPs of one training step (forward + backward) by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


TT_BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def measure_terratorch(args: argparse.Namespace, method: str) -> dict:
    """The same job in TerraTorch: its Prithvi-100M + UperNet model, frozen, full or LoRA r16
    (our ``deflect`` and ``lora`` both face TerraTorch's LoRA)."""
    import warnings

    import torch

    from deflect.engine.runtime import set_matmul_precision, tune_cpu_allocator

    warnings.filterwarnings("ignore")
    tune_cpu_allocator(args.terratorch_allocator)
    before = torch.get_float32_matmul_precision()
    from terratorch.models import EncoderDecoderFactory

    if torch.get_float32_matmul_precision() != before:  # TerraTorch 1.2 sets "medium" on import
        print(f"note: importing terratorch set float32 matmul precision {before!r} -> "
              f"{torch.get_float32_matmul_precision()!r}; both sides run at "
              f"{args.matmul_precision!r}", file=sys.stderr)  # fmt: skip
    set_matmul_precision(args.matmul_precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))  # fmt: skip
    peft = None
    if method in ("lora", "deflect", "scaled_lora"):
        peft = {"method": "LORA", "peft_config_kwargs": {"target_modules": LORA_TARGETS,
                                                          "r": 16, "lora_alpha": 16}}  # fmt: skip
    torch.manual_seed(0)
    rss_before_mib = current_rss_mib()
    model = EncoderDecoderFactory().build_model(
        task="segmentation", backbone="prithvi_eo_v1_100", backbone_pretrained=False,
        backbone_bands=TT_BANDS, backbone_img_size=args.img_size,
        necks=[{"name": "SelectIndices", "indices": [3, 5, 7, 11]},
               {"name": "ReshapeTokensToImage"}, {"name": "LearnedInterpolateToPyramidal"}],
        decoder="UperNetDecoder", decoder_channels=args.channels, num_classes=4,
        peft_config=peft,
    ).to(device).train()  # fmt: skip
    if method == "frozen":
        model.freeze_encoder()  # what SemanticSegmentationTask(freeze_backbone=True) calls
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-1)
    images = torch.randn(args.batch_size, 6, args.img_size, args.img_size, device=device)
    masks = torch.randint(0, 4, (args.batch_size, args.img_size, args.img_size), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images).output
        loss = loss_fn(logits.float(), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds, _ = timed_steps(step, args, device)
    peak_mib = peak_mem_mib(device, rss_before_mib)
    return {"framework": "terratorch", "finetune": method,
            "images_per_s": args.steps * args.batch_size / seconds,
            "peak_mem_mib": peak_mib,
            "trainable": sum(p.numel() for p in params), "gflop_per_step": step_flops(step) / 1e9}  # fmt: skip


def side_by_side(args: argparse.Namespace, passthrough: list[str]) -> list[dict]:
    """Ours (``encoder=prithvi_100m``) and TerraTorch's, alternating for ``args.rounds``
    rounds, each measurement in a fresh process; prints the medians and their ratio."""
    import statistics

    rows = []
    for finetune in args.finetune:
        runs: dict[str, list[dict]] = {"ours": [], "terratorch": []}
        for _ in range(args.rounds):
            for side, single in (("ours", ["prithvi_100m", finetune]),
                                 ("terratorch", ["terratorch", finetune])):  # fmt: skip
                cmd = [sys.executable, __file__, *passthrough, "--bands",
                       "B2,B3,B4,B8A,B11,B12", "--single", *single]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{side} {finetune} failed:\n{proc.stderr[-3000:]}")
                runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        ours = statistics.median(r["images_per_s"] for r in runs["ours"])
        theirs = statistics.median(r["images_per_s"] for r in runs["terratorch"])
        phases = runs["ours"][-1]["phases_s"]
        rows.append({"finetune": finetune, "ours_images_per_s": ours,
                     "terratorch_images_per_s": theirs, "ratio": ours / theirs,
                     "ours_gflop_per_step": runs["ours"][-1]["gflop_per_step"],
                     "terratorch_gflop_per_step": runs["terratorch"][-1]["gflop_per_step"],
                     "ours_peak_mib": runs["ours"][-1]["peak_mem_mib"],
                     "ours_mfu": runs["ours"][-1]["mfu"],
                     "terratorch_peak_mib": runs["terratorch"][-1]["peak_mem_mib"],
                     "ours_phases_s": phases, "rounds": args.rounds})  # fmt: skip
        print(f"{finetune:8s} ours {ours:7.3f} img/s  TerraTorch {theirs:7.3f} img/s  "
              f"ratio {ours / theirs:5.2f}  GFLOP/step {rows[-1]['ours_gflop_per_step']:.0f} vs "
              f"{rows[-1]['terratorch_gflop_per_step']:.0f}  phases {phases}", flush=True)  # fmt: skip
    return rows


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


def summary_line(r: dict) -> str:
    """One printed line of a measurement."""
    if r["mode"] == "predict":
        speed = f"{r['megapixels_per_s']:8.3f} Mpx/s ({r['tiles_per_s']:.1f} tiles/s)"
    else:
        speed = f"{r['images_per_s']:8.2f} img/s"
    mfu = f"  MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:g}" if r["mfu"] is not None else ""
    return (
        f"{r['mode']:7s} {r['encoder']:8s} {r['finetune']:8s} {r['device']:6s} {r['precision']}  "
        f"{speed}  peak {r['peak_mem_mib']:8.0f} MiB  {r['achieved_tflops']:.3f} TFLOP/s{mfu}  "
        f"encoder trainable {r['encoder_trainable']:>11,} ({r['encoder_trainable_percent']:.3f}%)"
    )


def main() -> None:
    """Parse arguments; run each pair in a subprocess (or measure one with --single)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--encoder", nargs="+", default=["vit_s16"])
    parser.add_argument("--finetune", nargs="+", default=["frozen", "full"])
    parser.add_argument("--mode", default="train", choices=["train", "eval", "predict"],
                        help="what to time: training steps, the evaluator, or predict.py on a scene")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=512, help="UperNet width")
    parser.add_argument("--eval-size", type=int, default=0,
                        help="--mode eval: image side (default img-size: one window per image)")  # fmt: skip
    parser.add_argument("--eval-stride", type=int, default=0,
                        help="eval/predict: sliding-window stride (default half the window)")  # fmt: skip
    parser.add_argument("--scene-size", type=int, default=2048,
                        help="--mode predict: side of the GeoTIFF scene")  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the device's peak for MFU (default: data sheet of known GPUs)")  # fmt: skip
    parser.add_argument("--bands", default="", help="comma-separated band names (default: demo's)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loader", default="", help="also time this dataset's training loader")
    parser.add_argument("--root", default="", help="its dataset.root")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="loader workers")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides of our model, e.g. segmentor.fold_laterals=false")  # fmt: skip
    parser.add_argument("--vs-terratorch", action="store_true",
                        help="the same job in TerraTorch, side by side (needs the bench extra)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (side by side)")
    parser.add_argument(
        "--matmul-precision", default="highest", choices=["highest", "high", "medium"],
        help="float32 matmul precision of both sides (highest: true fp32)",
    )  # fmt: skip
    parser.add_argument(
        "--terratorch-allocator", default="default", choices=["default", "tuned"],
        help="TerraTorch side's glibc allocator (ours follows cpu_allocator, tuned by default)",
    )  # fmt: skip
    parser.add_argument(
        "--single", nargs=2, metavar=("ENCODER", "FINETUNE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.mode == "train" and args.batch_size < 2:
        parser.error("--batch-size must be >= 2 to train (the decoder's BatchNorm needs 2 images)")
    if args.loader and not args.single:
        for workers in args.workers:
            r = measure_loader(args, workers)
            note = f"  ({r['restarts']} epoch restarts included)" if r["restarts"] else ""
            print(f"loader {r['dataset']} ({r['samples']} training samples), {workers} workers: "
                  f"{r['loader_images_per_s']:8.2f} img/s{note}", flush=True)  # fmt: skip
    if args.single:
        import warnings

        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        if args.single[0] == "terratorch":
            print(json.dumps(measure_terratorch(args, args.single[1])))
        else:
            print(json.dumps(measure(args, *args.single)))
        return
    passthrough = [a for a in sys.argv[1:] if a != "--vs-terratorch"]
    if args.vs_terratorch:
        print(json.dumps(side_by_side(args, passthrough), indent=2))
        return
    rows, failed = [], []
    for encoder in args.encoder:
        for finetune in args.finetune:
            cmd = [sys.executable, __file__, *passthrough, "--single", encoder, finetune]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{encoder} {finetune}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                failed.append(f"{encoder} {finetune}")
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(summary_line(r), flush=True)
    print(json.dumps(rows, indent=2))
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
