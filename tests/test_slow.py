"""Slow tests (``make test-slow``): real sizes, the demo as the README runs it, and every
deliberate bug of ``scripts/mutants.py`` caught by the default suite."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch

from deflect import DeflectConfig, get_deflect_model
from deflect.encoders import ViTEncoder
from tests.conftest import REPO, S2_BANDS, run_cli, s2_spec

pytestmark = pytest.mark.slow


def test_every_deliberate_bug_is_caught():
    """Each mutant of scripts/mutants.py (a dropped term, a wrong order, ...) turns a test red."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "mutants.py")],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("CAUGHT") >= 20 and "MISSED" not in proc.stdout


def test_deflect_on_vit_b16_with_eleven_bands_at_224_px():
    """Real size: identity at initialisation, the parameter count of docs/method.md, finite gradients."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = ViTEncoder("vit_b16", "vit_base_patch16_224", s2_spec(), img_size=224,
                             output_layers=[3, 5, 7, 11]).eval()  # fmt: skip
    reference = copy.deepcopy(encoder)
    adapted = get_deflect_model(encoder, DeflectConfig())
    assert (
        adapted.num_adapter_parameters()
        == 22 * 8 * 768 + 768 + 2 * 768 * 8 + 8 + 768 + 3 * 4 * 768 * 8
    )
    x = torch.randn(1, len(S2_BANDS), 224, 224)
    with torch.no_grad():
        for a, b in zip(adapted(x), reference(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    adapted.train()
    sum(f.square().mean() for f in adapted(x)).backward()
    grads = [p.grad for p in adapted.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_the_demo_as_the_readme_runs_it(tmp_path, demo_root):
    """The default config (DEFLECT on ViT-S/16, 64-px tiles), shortened to two epochs, and its
    re-evaluation from the run folder."""
    run_cli([f"dataset.root={demo_root}", "epochs=2", "num_workers=0"], tmp_path, timeout=1800)
    (work_dir,) = (tmp_path / "work_dirs").glob("2*_vit_s16_deflect_demo")
    summary = json.loads((work_dir / "metrics.json").read_text())
    assert (
        summary["params"]["encoder_trainable"]
        == 9 * 8 * 384 + 384 + 2 * 384 * 8 + 8 + 384 + 3 * 4 * 384 * 8
    )
    assert 0 < summary["test"]["mIoU"] <= 1 and summary["test"]["pixels"] == 64 * 300
    run_cli([f"eval_dir={work_dir}"], tmp_path, timeout=1800)
    again = json.loads((work_dir / "test_metrics.json").read_text())
    assert again["confusion_matrix"] == summary["test"]["confusion_matrix"]


def test_compiled_training_step_matches_eager():
    """``compile=true``: the compiled model (DEFLECT on the tiny ViT, UperNet with its fast
    fusion) gives the eager model's logits and gradients."""
    from hydra import compose, initialize_config_dir

    from deflect.data import DataSpec
    from deflect.engine import build

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "encoder=tiny_vit",
                "img_size=32",
                "segmentor.channels=16",
                "segmentor.dropout=0",
                "compile=true",
            ],
        )  # fmt: skip (dropout: RNG)
    bands = ("B2", "B3", "B4", "B8")
    data = DataSpec(bands=bands, mean=dict.fromkeys(bands, 0.1), std=dict.fromkeys(bands, 0.05),
                    reflectance_scale=1.0, classes=("a", "b", "c"))  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = build.build_model(cfg, data).train()
    for p in eager.parameters():  # adapters away from zero, so they shape the output
        if p.requires_grad:
            p.data.add_(0.02 * torch.randn_like(p))
    compiled = build.compile_if_asked(copy.deepcopy(eager), cfg)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    x = torch.rand(4, 4, 32, 32) * 0.3
    grads = []
    for model in (eager, compiled):
        logits = model(x)
        logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        if model is eager:
            reference = logits.detach()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    torch.testing.assert_close(logits.detach(), reference, atol=1e-4, rtol=1e-4)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-3)
