"""On a CUDA GPU (``pytest -m gpu``; skipped without one): the GPU computes what the CPU computes
in fp32, bf16/fp16 autocast tracks fp32, activation checkpointing replays CUDA's random draws,
run.py trains under torchrun with NCCL on every visible GPU and re-evaluates to the same
confusion matrix, and predict.py's class map on the GPU equals the CPU's.

``DEFLECT_TEST_GPU_DEVICE=cpu pytest -m gpu tests/test_gpu.py`` runs the same checks with the CPU
standing in for the GPU, to try them out on a machine without one.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from tests.conftest import REPO, TINY, run_cli, s2_spec

GPU = torch.device(os.environ.get("DEFLECT_TEST_GPU_DEVICE", "cuda"))
HAVE_GPU = GPU.type == "cpu" or torch.cuda.is_available()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA device"),
]

BANDS = ["B2", "B3", "B4", "B8A", "B11", "B12"]
METHODS = ["frozen", "deflect", "lora", "full"]


@pytest.fixture(autouse=True)
def true_fp32():
    """Every test starts at true fp32 (matmuls and cuDNN convolutions) and restores the flags."""
    from deflect.engine.runtime import set_matmul_precision

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    set_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def segmentor(finetune: str, *overrides: str):
    """ViT-S/16 at 64 px with 6 bands and a 64-channel UperNet, built as run.py builds it."""
    from hydra import compose, initialize_config_dir

    from deflect.engine.build import build_model

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["encoder=vit_s16", f"finetune={finetune}", "img_size=64",
                       "segmentor.channels=64", *overrides],
        )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return build_model(cfg, s2_spec(BANDS, classes=("a", "b", "c", "d")))


def inputs(device, batch: int = 4, size: int = 64):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, len(BANDS), size, size, generator=generator)
    masks = torch.randint(0, 4, (batch, size, size), generator=generator)
    return images.to(device), masks.to(device)


def loss_and_grads(model, device, precision: str = "fp32"):
    """Cross-entropy of the model in eval mode (no dropout, BatchNorm's running statistics:
    the same function on both devices) and the gradients of what trains."""
    from deflect.engine.evaluator import autocast_context

    model = model.to(device).eval()
    images, masks = inputs(device)
    model.zero_grad(set_to_none=True)
    with autocast_context(device, precision):
        logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits.float(), masks)
    loss.backward()
    grads = {
        n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad
    }
    return float(loss.detach()), logits.detach().float().cpu(), grads


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("finetune", METHODS)
def test_fp32_on_the_gpu_equals_the_cpu(finetune):
    model = segmentor(finetune)
    cpu_loss, cpu_logits, cpu_grads = loss_and_grads(model, torch.device("cpu"))
    gpu_loss, gpu_logits, gpu_grads = loss_and_grads(model, GPU)
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
    assert relative_error(gpu_logits, cpu_logits) < 1e-5
    assert set(gpu_grads) == set(cpu_grads) and cpu_grads
    for name, grad in cpu_grads.items():
        if grad.norm() > 0:
            assert relative_error(gpu_grads[name], grad) < 1e-3, name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("finetune", ["deflect", "full"])
def test_mixed_precision_tracks_fp32(finetune, precision):
    """Autocast changes the arithmetic, not the function: the loss within 2 %, the gradient
    of what trains pointing the same way (cosine > 0.98)."""
    model = segmentor(finetune).to(GPU)
    loss, _, grads = loss_and_grads(model, GPU)
    low_loss, _, low_grads = loss_and_grads(model, GPU, precision)
    assert low_loss == pytest.approx(loss, rel=2e-2)
    flat = torch.cat([g.flatten() for g in grads.values()])
    low = torch.cat([low_grads[n].flatten() for n in grads])
    assert torch.isfinite(low).all()
    assert float(torch.nn.functional.cosine_similarity(low, flat, dim=0)) > 0.98


@pytest.mark.parametrize("finetune", ["deflect", "full"])
def test_activation_checkpointing_replays_the_gpus_random_draws(finetune):
    """In training mode (dropout, drop path): recomputation draws the same masks on the GPU."""
    grads = []
    for checkpointing in (False, True):
        model = segmentor(
            finetune, f"activation_checkpointing={str(checkpointing).lower()}",
            "encoder.arch_kwargs={drop_path_rate: 0.1}",
        ).to(GPU).train()  # fmt: skip
        images, masks = inputs(GPU)
        torch.manual_seed(3)
        loss = torch.nn.functional.cross_entropy(model(images), masks)
        loss.backward()
        grads.append({n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad})
    plain, recomputed = grads
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def gpu_run(demo_root, tmp_path_factory):
    """run.py with bf16 on every visible GPU under torchrun (NCCL), then re-evaluated."""
    cwd = tmp_path_factory.mktemp("gpu_run")
    nproc = torch.cuda.device_count() if GPU.type == "cuda" else 1
    args = [a for a in TINY if not a.startswith("device=")]
    work_dir = cwd / "run"
    proc = run_cli(
        [*args, f"device={GPU.type}", "precision=bf16", f"dataset.root={demo_root}",
         f"work_dir={work_dir}", "finetune=deflect"],
        cwd, nproc=nproc,
    )  # fmt: skip
    return work_dir, nproc, proc.stdout + proc.stderr


def test_torchrun_trains_on_every_gpu_and_reevaluates_to_the_same_numbers(gpu_run, tmp_path):
    work_dir, nproc, output = gpu_run
    summary = json.loads((work_dir / "metrics.json").read_text())
    assert 0 < summary["test"]["mIoU"] <= 1
    if GPU.type == "cuda":
        assert summary["peak_memory_kind"] != "host_rss"
    assert summary["test"]["pixels"] == 64 * 300  # the demo's test strip, each pixel once
    run_cli([f"eval_dir={work_dir}"], tmp_path)  # one process, in the run's bf16
    again = json.loads((work_dir / "test_metrics.json").read_text())
    assert again["confusion_matrix"] == summary["test"]["confusion_matrix"]


def test_predict_on_the_gpu_equals_the_cpu(gpu_run, demo_root, tmp_path):
    import rasterio

    from deflect.predict import load_predictor, predict_scenes

    work_dir, _, _ = gpu_run
    scene = sorted((demo_root / "test").glob("*_image.tif"))[0]
    maps = []
    for device in ("cpu", GPU):
        predictor = load_predictor(work_dir, device, precision="fp32")
        (out,) = predict_scenes(predictor, [scene], tmp_path / str(device), progress=False)
        with rasterio.open(out.prediction) as src:
            maps.append(src.read(1))
            with rasterio.open(scene) as ref:
                assert src.crs == ref.crs and src.transform == ref.transform
    cpu_map, gpu_map = maps
    assert (cpu_map == gpu_map).mean() > 0.999
