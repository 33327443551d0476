"""DEFLECT's parts against independent oracles and its invariants (tiny ViTs, CPU)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import spyndex
import torch

from deflect import DeflectConfig, get_deflect_model
from deflect.encoders import ViTEncoder
from deflect.tuners.deflect import layer as deflect_layer
from deflect.tuners.deflect.indices import SpectralIndices, resolve_indices, wavelength_constants
from deflect.tuners.deflect.upe import UntangledPatchEmbedding, pixel_set_statistics
from tests.conftest import tiny_timm_vit as tiny_vit

S2_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
DEMO_BANDS = ["B2", "B3", "B4", "B8"]
SYMBOLS = {"B1": "A", "B2": "B", "B3": "G", "B4": "R", "B5": "RE1", "B6": "RE2", "B7": "RE3"}
SYMBOLS |= {"B8": "N", "B8A": "N2", "B11": "S1", "B12": "S2"}


def tiny_encoder(bands: list[str] = S2_BANDS) -> ViTEncoder:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = ViTEncoder(
            name="tiny",
            arch="vit_tiny_patch16_224",
            input_bands=bands,
            rgb_bands=["B4", "B3", "B2"],
            img_size=32,
            patch_size=8,
            output_layers=[1, 3],
            arch_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 4},
        )
    return encoder.eval()


def rgb(x: torch.Tensor, bands: list[str] = S2_BANDS) -> torch.Tensor:
    return x[:, [bands.index(b) for b in ("B4", "B3", "B2")]]


def perturb(model: torch.nn.Module, scale: float = 0.5) -> None:
    """Give U_ℓ (zero at init) non-zero values, so the adapter is no longer the identity."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "deflect_" in name and name.endswith("U.weight"):
                p.normal_(0, scale)


@pytest.fixture
def x11() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.rand(2, len(S2_BANDS), 32, 32) * 0.5 + 0.01


# ---- spectral indices ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["NDVI", "NDWI", "MNDWI", "NBR", "EVI", "SAVI", "FAI", "FDI"])
def test_index_equals_spyndex(name: str) -> None:
    rng = np.random.default_rng(0)
    refl = rng.uniform(0.02, 0.6, size=(len(S2_BANDS), 6, 7)).astype(np.float32)
    refl[S2_BANDS.index("B2")] *= 0.1  # keeps EVI's denominator away from 0
    ours = SpectralIndices([name], S2_BANDS)(torch.from_numpy(refl)[None])[0, 0].numpy()
    params = {SYMBOLS[b]: refl[i].astype(np.float64) for i, b in enumerate(S2_BANDS)}
    params |= {c: spyndex.constants[c].default for c in ("g", "C1", "C2", "L")}
    params |= wavelength_constants(S2_BANDS)
    needed = spyndex.indices[name].bands
    expected = spyndex.computeIndex(name, params={k: v for k, v in params.items() if k in needed})
    assert np.abs(expected).max() < 10  # the clamp is not what we compare
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_wavelengths_come_from_spyndex_band_metadata() -> None:
    consts = wavelength_constants(S2_BANDS)
    assert consts["lambdaN"] == spyndex.bands.N.sentinel2a.wavelength
    assert consts["lambdaS1"] == spyndex.bands.S1.sentinel2a.wavelength
    hls = wavelength_constants(["B2", "B3", "B4", "B8A"], nir_from_b8a=True)
    assert hls["lambdaN"] == spyndex.bands.N2.sentinel2a.wavelength


def test_index_division_by_zero_gives_zero_and_clamps() -> None:
    refl = torch.zeros(1, 4, 2, 2)
    refl[0, 3, 0, 0] = 1.0  # N=1, R=0 at one pixel
    out = SpectralIndices(["NDVI", "EVI"], DEMO_BANDS, clamp=10.0)(refl)
    assert torch.isfinite(out).all()
    assert out[0, 0, 1, 1] == 0  # 0/0 -> 0
    assert out[0, 0, 0, 0] == 1
    refl = torch.zeros(1, 4, 1, 1)
    refl[0, 3] = 1.0  # EVI denominator: N + 6R - 7.5B + L = 2 ; now make it ~0
    refl[0, 0] = 2.0 / 7.5 + 1e-7
    assert SpectralIndices(["EVI"], DEMO_BANDS, clamp=10.0)(refl).abs().max() <= 10.0


def test_indices_use_unnormalised_reflectance() -> None:
    mean = {b: 1000.0 + 100 * i for i, b in enumerate(DEMO_BANDS)}
    std = {b: 500.0 + 10 * i for i, b in enumerate(DEMO_BANDS)}
    upe = UntangledPatchEmbedding(
        DEMO_BANDS, 16, 8, ["EVI"], band_mean=mean, band_std=std, reflectance_scale=10000.0
    )
    torch.manual_seed(0)
    dn = torch.rand(1, 4, 8, 8) * 3000 + 200  # L2A digital numbers
    m = torch.tensor([mean[b] for b in DEMO_BANDS]).view(1, 4, 1, 1)
    s = torch.tensor([std[b] for b in DEMO_BANDS]).view(1, 4, 1, 1)
    features = upe.pixel_features((dn - m) / s)  # what the data pipeline feeds
    refl = (dn / 10000).double().numpy()[0]
    params = {"B": refl[0], "G": refl[1], "R": refl[2], "N": refl[3], "g": 2.5, "C1": 6.0}
    params |= {"C2": 7.5, "L": 1.0}
    expected = spyndex.computeIndex("EVI", params=params)
    expected = np.clip(expected, -10, 10)  # the documented clamp
    np.testing.assert_allclose(features[0, 4].numpy(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features[:, :4], (dn - m) / s)  # raw normalised bands come first


def test_indices_stay_fp32_under_autocast() -> None:
    upe = UntangledPatchEmbedding(DEMO_BANDS, 16, 8, ["NDVI"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert upe.pixel_features(torch.rand(1, 4, 8, 8)).dtype == torch.float32


def test_index_errors_name_index_band_and_symbol() -> None:
    with pytest.raises(ValueError, match=r"NBR.*S2 \(band B12\)"):
        resolve_indices(["NBR"], DEMO_BANDS)
    with pytest.raises(ValueError, match=r"unknown spyndex index 'NVDI'.*NDVI"):
        resolve_indices(["NVDI"], DEMO_BANDS)
    with pytest.raises(ValueError, match=r"NBR.*B12"):
        DeflectConfig(bands=DEMO_BANDS, indices=["NDVI", "NBR"])


def test_auto_indices() -> None:
    auto = resolve_indices("auto", S2_BANDS)
    assert {"NDVI", "EVI", "NBR", "MNDWI", "FAI"} <= set(auto)
    assert all(spyndex.indices[n].application_domain != "radar" for n in auto)
    assert all(
        not n.startswith("k") for n in auto if spyndex.indices[n].application_domain == "kernel"
    )
    demo = resolve_indices("auto", DEMO_BANDS)
    assert "NDVI" in demo and "NBR" not in demo
    out = SpectralIndices(auto, S2_BANDS)(torch.rand(1, 11, 4, 4))
    assert out.shape == (1, len(auto), 4, 4) and torch.isfinite(out).all()


# ---- pixel-set statistics -----------------------------------------------------------------------
def test_pixel_set_statistics_equal_numpy() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 3, 8, 12)
    stats = ["mean", "std", "min", "max", "q10", "q25", "median", "q75", "q90"]
    out = pixel_set_statistics(features, 4, stats)  # (B, N, F*S)
    assert out.shape == (2, 6, 3 * len(stats))
    b, f, row, col = 1, 2, 1, 2  # patch (1, 2) -> token 1*3+2
    pixels = features[b, f, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].double().numpy().ravel()
    expected = [pixels.mean(), pixels.std(), pixels.min(), pixels.max()]
    expected += list(np.quantile(pixels, [0.1, 0.25, 0.5, 0.75, 0.9], method="linear"))
    got = out[b, row * 3 + col, f * len(stats) : (f + 1) * len(stats)].double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_pixels_per_patch_samples_in_training_only() -> None:
    upe = UntangledPatchEmbedding(DEMO_BANDS, 16, 8, ["NDVI"], pixels_per_patch=5)
    x = torch.rand(2, 4, 16, 16)
    upe.eval()
    assert torch.equal(upe(x), upe(x))
    upe.train()
    assert not torch.equal(upe(x), upe(x))
    torch.manual_seed(0)
    sub = pixel_set_statistics(x, 8, ["min", "max"], pixels_per_patch=5)
    full = pixel_set_statistics(x, 8, ["min", "max"])
    assert (sub[..., 0::2] >= full[..., 0::2]).all() and (sub[..., 1::2] <= full[..., 1::2]).all()


# ---- identity at initialisation -------------------------------------------------------------------
@pytest.mark.parametrize("deflection", ["hard", "soft", "none"])
def test_identity_at_init_timm_vit(deflection: str, x11: torch.Tensor) -> None:
    model = tiny_vit()
    base = copy.deepcopy(model)
    adapted = get_deflect_model(model, DeflectConfig(bands=S2_BANDS, deflection=deflection))
    with torch.no_grad():
        torch.testing.assert_close(adapted(x11), base(rgb(x11)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            adapted.forward_features(x11), base.forward_features(rgb(x11)), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("deflection", ["hard", "soft", "none"])
def test_identity_at_init_vit_encoder(deflection: str, x11: torch.Tensor) -> None:
    encoder = tiny_encoder()
    base = copy.deepcopy(encoder)
    adapted = get_deflect_model(encoder, DeflectConfig(bands=S2_BANDS, deflection=deflection))
    with torch.no_grad():
        ours, theirs = adapted.forward_features(x11), base.forward_features(x11)
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_identity_with_layer_scale_and_qk_norm(x11: torch.Tensor) -> None:
    model = tiny_vit(init_values=0.1, qk_norm=True)
    base = copy.deepcopy(model)
    adapted = get_deflect_model(model, DeflectConfig(bands=S2_BANDS, target_blocks=[1, 3]))
    with torch.no_grad():
        torch.testing.assert_close(adapted(x11), base(rgb(x11)), atol=1e-5, rtol=1e-5)


def test_sqrt_2d_temperature_is_not_identity(x11: torch.Tensor) -> None:
    model = tiny_vit()
    base = copy.deepcopy(model)
    adapted = get_deflect_model(model, DeflectConfig(bands=S2_BANDS, temperature="sqrt_2d"))
    with torch.no_grad():
        assert not torch.allclose(adapted(x11), base(rgb(x11)), atol=1e-4)


def test_perturbed_adapter_changes_outputs(x11: torch.Tensor) -> None:
    model = tiny_vit()
    base = copy.deepcopy(model)
    adapted = get_deflect_model(model, DeflectConfig(bands=S2_BANDS))
    perturb(adapted)
    with torch.no_grad():
        assert not torch.allclose(adapted(x11), base(rgb(x11)), atol=1e-3)


# ---- gradients and training -------------------------------------------------------------------------
def test_blocks_before_first_target_run_without_autograd(x11: torch.Tensor) -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS, target_blocks=[2]))
    seen = {}
    hook = adapted.base_model.blocks[2].register_forward_pre_hook(
        lambda m, args: seen.update(requires_grad=args[0].requires_grad)
    )
    out = adapted(x11)
    hook.remove()
    assert seen["requires_grad"] is False
    assert out.requires_grad


def test_only_deflect_params_train_and_all_get_gradients(x11: torch.Tensor) -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS))
    adapted.train()
    trainable = {n: p for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".deflect_" in n for n in trainable)
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if "deflect_" not in n)
    adapted(x11).square().mean().backward()
    for name, p in trainable.items():
        assert p.grad is not None, name
        if name.endswith("U.weight"):
            assert p.grad.abs().sum() > 0, name
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    optimizer.step()
    optimizer.zero_grad()
    adapted(x11).square().mean().backward()
    for name, p in trainable.items():  # U != 0 now: every parameter, V_ℓ included, gets a signal
        assert p.grad.abs().sum() > 0, name


def test_frozen_weights_bit_identical_after_steps(x11: torch.Tensor) -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS, deflection="soft"))
    adapted.train()
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        loss = adapted(x11).square().mean() + sum(adapted.auxiliary_losses().values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, p in adapted.named_parameters():
        if "deflect_" in name:
            assert not torch.equal(p, before[name]), f"{name} did not move"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


# ---- deflection -------------------------------------------------------------------------------------
def test_hard_deflection_keeps_rgb_update_norm(monkeypatch, x11: torch.Tensor) -> None:
    seen = []
    original = deflect_layer.deflect_update

    def spy(delta_uatt, delta_rgb, mode, eps):
        delta = original(delta_uatt, delta_rgb, mode, eps)
        seen.append((delta_uatt, delta_rgb, delta))
        return delta

    monkeypatch.setattr(deflect_layer, "deflect_update", spy)
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS))
    perturb(adapted)
    with torch.no_grad():
        adapted(x11)
    assert len(seen) == 3
    for delta_uatt, delta_rgb, delta in seen:
        assert not torch.allclose(delta_uatt, delta_rgb, atol=1e-3)  # the adapter acts
        torch.testing.assert_close(delta.norm(dim=-1), delta_rgb.norm(dim=-1))
        cos = torch.nn.functional.cosine_similarity(delta, delta_uatt, dim=-1)
        torch.testing.assert_close(cos, torch.ones_like(cos))


def test_soft_deflection_reports_auxiliary_loss(x11: torch.Tensor) -> None:
    config = DeflectConfig(bands=S2_BANDS, deflection="soft", lambda_deflection=2.0)
    adapted = get_deflect_model(tiny_vit(), config)
    adapted.train()
    adapted(x11)
    aux = adapted.auxiliary_losses()
    assert set(aux) == {"deflection"} and aux["deflection"].item() == pytest.approx(0, abs=1e-5)
    perturb(adapted)
    adapted(x11)
    loss = adapted.auxiliary_losses()["deflection"]
    assert loss.item() > 0 and loss.requires_grad
    adapted.eval()
    adapted(x11)
    assert adapted.auxiliary_losses() == {}
    hard = get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS)).train()
    hard(x11)
    assert hard.auxiliary_losses() == {}


def test_state_is_cleared_and_calls_repeat(x11: torch.Tensor) -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS))
    perturb(adapted)
    with torch.no_grad():
        first = adapted(x11)
        second = adapted(x11)
        other = adapted(x11.flip(-1))
    assert torch.equal(first, second) and not torch.allclose(first, other)
    state = adapted.tuner.state
    assert state._tokens is None and state._pending is None and state._finish is None
    with pytest.raises(RuntimeError, match="without a spectral stream"):
        adapted.base_model.blocks[1](torch.zeros(1, 17, 32))


def test_learned_cls_and_no_norm_match_run(x11: torch.Tensor) -> None:
    config = DeflectConfig(bands=S2_BANDS, cls_token="learned", norm_match=False, rank=2)
    adapted = get_deflect_model(tiny_vit(), config)
    n_cls = [
        n for n, _ in adapted.named_parameters() if n.endswith("deflect_upe.default.cls_token")
    ]
    assert len(n_cls) == 1
    assert adapted(x11).shape == (2, 32)


def test_bf16_autocast_forward(x11: torch.Tensor) -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS))
    perturb(adapted)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapted(x11)
    assert torch.isfinite(out.float()).all()


def test_two_training_forwards_then_one_backward(x11: torch.Tensor) -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS)).train()
    perturb(adapted)
    (adapted(x11).sum() + adapted(x11.flip(-1)).sum()).backward()
    grads = [p.grad for p in adapted.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
