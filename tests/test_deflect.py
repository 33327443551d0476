"""DEFLECT's parts against independent oracles and its invariants (tiny ViTs, CPU)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import spyndex
import torch

from deflect import DataSpec, DeflectConfig, get_deflect_model
from deflect.tuners.deflect.indices import (
    SpectralIndices,
    available_symbols,
    resolve_indices,
    wavelength_constants,
)
from deflect.tuners.deflect.upe import UntangledPatchEmbedding, pixel_set_statistics
from tests.conftest import S2_BANDS, s2_spec, tiny_encoder
from tests.conftest import tiny_timm_vit as tiny_vit
from tests.fakes import DEMO_BANDS

SYMBOLS = {"B1": "A", "B2": "B", "B3": "G", "B4": "R", "B5": "RE1", "B6": "RE2", "B7": "RE3"}
SYMBOLS |= {"B8": "N", "B8A": "N2", "B11": "S1", "B12": "S2"}


def rgb(x: torch.Tensor, bands: list[str] = S2_BANDS) -> torch.Tensor:
    return x[:, [bands.index(b) for b in ("B4", "B3", "B2")]]


def perturb(model: torch.nn.Module, scale: float = 0.5) -> None:
    """Give U_ℓ (zero at init) non-zero values, so the adapter is no longer the identity."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "deflect_" in name and name.endswith("U.weight"):
                p.normal_(0, scale)


def adapt(model=None, **config) -> torch.nn.Module:
    return get_deflect_model(model or tiny_vit(), DeflectConfig(**config), data=s2_spec())


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


DEMO_MEAN = [465.2907, 673.4912, 762.2167, 2272.6192]  # the demo's statistics: not exact
DEMO_STD = [183.1734, 221.0933, 441.8651, 401.6916]  # in fp16


def demo_upe(**kwargs) -> UntangledPatchEmbedding:
    data = DataSpec(
        bands=tuple(DEMO_BANDS),
        mean=dict(zip(DEMO_BANDS, DEMO_MEAN)),
        std=dict(zip(DEMO_BANDS, DEMO_STD)),
        reflectance_scale=10000.0,
    )
    return UntangledPatchEmbedding(data, 16, 8, kwargs.pop("indices", ["EVI"]), **kwargs)


def test_indices_use_unnormalised_reflectance() -> None:
    upe = demo_upe()
    torch.manual_seed(0)
    dn = torch.rand(1, 4, 8, 8) * 3000 + 200  # L2A digital numbers
    m = torch.tensor(DEMO_MEAN).view(1, 4, 1, 1)
    s = torch.tensor(DEMO_STD).view(1, 4, 1, 1)
    features, valid = upe.pixel_features((dn - m) / s)  # what the data pipeline feeds
    assert valid.all()
    refl = (dn / 10000).double().numpy()[0]
    params = {"B": refl[0], "G": refl[1], "R": refl[2], "N": refl[3], "g": 2.5, "C1": 6.0}
    params |= {"C2": 7.5, "L": 1.0}
    expected = spyndex.computeIndex("EVI", params=params)
    expected = np.clip(expected, -10, 10)  # the documented clamp
    np.testing.assert_allclose(features[0, 4].numpy(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features[:, :4], (dn - m) / s)  # raw normalised bands come first


def test_indices_stay_fp32_under_autocast_and_after_half() -> None:
    """Index arithmetic runs in fp32 from fp32 statistics, whatever the model's dtype: a model
    cast with .half() gives the fp32 features of its (fp16) input."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = demo_upe(indices=["NDVI"]).pixel_features(torch.rand(1, 4, 8, 8))[0]
        assert features.dtype == torch.float32
    upe = demo_upe(indices=["NDVI", "EVI"])  # cast before its first forward, as users do
    torch.manual_seed(0)
    m = torch.tensor(DEMO_MEAN).view(1, 4, 1, 1)
    s = torch.tensor(DEMO_STD).view(1, 4, 1, 1)
    x = ((torch.rand(1, 4, 8, 8) * 3000 + 200) - m) / s
    x16 = x.half()
    # fp32 statistics on the fp16-rounded input, from a model that is never cast
    expected, _ = demo_upe(indices=["NDVI", "EVI"]).pixel_features(x16.float())
    got, _ = upe.half().pixel_features(x16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert upe(x16).dtype == torch.float16  # the trainable part runs in the model's dtype


def test_index_errors_name_index_band_and_symbol() -> None:
    with pytest.raises(ValueError, match=r"NBR.*S2 \(band B12\)"):
        resolve_indices(["NBR"], DEMO_BANDS)
    with pytest.raises(ValueError, match=r"unknown spyndex index 'NVDI'.*NDVI"):
        resolve_indices(["NVDI"], DEMO_BANDS)


def test_auto_is_every_computable_index_and_each_equals_spyndex() -> None:
    """``auto``: every spyndex index whose bands are present and whose constants have defaults,
    with no filter by domain (snow and cloud indices included)."""
    defaults = {c for c in spyndex.constants if spyndex.constants[c].default is not None}
    lambdas = {
        f"lambda{SYMBOLS[b]}" for b in S2_BANDS if f"lambda{SYMBOLS[b]}" in spyndex.constants
    }
    symbols = {SYMBOLS[b] for b in S2_BANDS} | defaults | lambdas
    expected = sorted(n for n in spyndex.indices if set(spyndex.indices[n].bands) <= symbols)
    auto = resolve_indices("auto", S2_BANDS)
    assert auto == expected and {"NDSI", "CSISWIR", "NDVI"} <= set(auto)
    assert available_symbols(S2_BANDS) >= symbols
    rng = np.random.default_rng(1)
    refl = rng.uniform(0.05, 0.5, size=(len(S2_BANDS), 5, 5))
    ours = SpectralIndices(auto, S2_BANDS, clamp=1e6)(torch.from_numpy(refl)[None]).double()
    params = {SYMBOLS[b]: refl[i] for i, b in enumerate(S2_BANDS)}
    params |= {c: spyndex.constants[c].default for c in defaults}
    params |= wavelength_constants(S2_BANDS)
    compared = 0
    for k, name in enumerate(auto):
        needed = spyndex.indices[name].bands
        with np.errstate(all="ignore"):
            value = np.asarray(spyndex.computeIndex(name, params={s: params[s] for s in needed}))
        value = np.broadcast_to(value, (5, 5))
        finite = np.isfinite(value) & (np.abs(value) < 1e5)
        np.testing.assert_allclose(ours[0, k].numpy()[finite], value[finite], rtol=1e-4,
                                   atol=1e-5, err_msg=name)  # fmt: skip
        compared += finite.all()
    assert compared > 0.9 * len(auto)


def test_default_indices_keep_the_computable_curated_ones() -> None:
    assert resolve_indices("default", S2_BANDS) == [
        "NDVI", "NDWI", "MNDWI", "NDBI", "NBR", "NDMI", "EVI", "SAVI", "NDTI", "FAI", "FDI",
    ]  # fmt: skip
    assert resolve_indices("default", DEMO_BANDS) == ["NDVI", "NDWI", "EVI", "SAVI", "NDTI"]


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


def test_pixel_set_statistics_of_tubelets_are_frame_major() -> None:
    """(B, F, T, H, W) with tubelet 1: tokens of frame 0, then frame 1, as Conv3d + flatten."""
    torch.manual_seed(0)
    video = torch.randn(1, 2, 2, 8, 8)
    out = pixel_set_statistics(video, 4, ["mean", "max"], tubelet_size=1)  # (1, 2*4, 2*2)
    for t in range(2):
        frame = pixel_set_statistics(video[:, :, t], 4, ["mean", "max"])
        torch.testing.assert_close(out[:, 4 * t : 4 * t + 4], frame)


def test_pixels_per_patch_samples_in_training_only() -> None:
    upe = demo_upe(indices=["NDVI"], pixels_per_patch=5)
    x = torch.rand(2, 4, 16, 16)
    upe.eval()
    assert torch.equal(upe(x), upe(x))
    upe.train()
    assert not torch.equal(upe(x), upe(x))
    torch.manual_seed(0)
    sub = pixel_set_statistics(x, 8, ["min", "max"], pixels_per_patch=5)
    full = pixel_set_statistics(x, 8, ["min", "max"])
    assert (sub[..., 0::2] >= full[..., 0::2]).all() and (sub[..., 1::2] <= full[..., 1::2]).all()


# ---- identity at initialisation (the matrix covers the plain cases) --------------------------------
def test_identity_with_layer_scale_and_qk_norm(s2_reflectance: torch.Tensor) -> None:
    model = tiny_vit(init_values=0.1, qk_norm=True)
    base = copy.deepcopy(model)
    adapted = adapt(model, target_blocks=[1, 3])
    with torch.no_grad():
        torch.testing.assert_close(
            adapted(s2_reflectance), base(rgb(s2_reflectance)), atol=1e-5, rtol=1e-5
        )


def test_sqrt_2d_temperature_is_not_identity(s2_reflectance: torch.Tensor) -> None:
    model = tiny_vit()
    base = copy.deepcopy(model)
    adapted = adapt(model, temperature="sqrt_2d")
    with torch.no_grad():
        assert not torch.allclose(adapted(s2_reflectance), base(rgb(s2_reflectance)), atol=1e-4)


def test_identity_through_the_framework_encoder(s2_reflectance: torch.Tensor) -> None:
    encoder = tiny_encoder(output_layers=[1, 3])
    base = copy.deepcopy(encoder)
    adapted = get_deflect_model(encoder, DeflectConfig())
    with torch.no_grad():
        ours, theirs = (
            adapted.forward_features(s2_reflectance),
            base.forward_features(s2_reflectance),
        )
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- gradients and training -------------------------------------------------------------------------
def test_blocks_before_first_target_run_without_autograd(s2_reflectance: torch.Tensor) -> None:
    adapted = adapt(target_blocks=[2])
    seen = {}
    hook = adapted.base_model.blocks[2].register_forward_pre_hook(
        lambda m, args: seen.update(requires_grad=args[0].requires_grad)
    )
    out = adapted(s2_reflectance)
    hook.remove()
    assert seen["requires_grad"] is False
    assert out.requires_grad


def test_learned_cls_has_no_first_step_gradient_spike(s2_reflectance: torch.Tensor) -> None:
    """Under norm matching the learned CLS is divided by its own norm; it starts at unit norm
    (not zero), so its first gradient is of the order of the later ones."""
    adapted = adapt(cls_token="learned")
    perturb(adapted)
    cls = next(
        p for n, p in adapted.named_parameters() if n.endswith("deflect_upe.default.cls_token")
    )
    assert cls.norm().item() == pytest.approx(1.0, rel=0.3)
    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.05)
    norms = []
    for _ in range(5):
        optimizer.zero_grad()
        (adapted(s2_reflectance) - 0.5).square().mean().backward()
        norms.append(cls.grad.norm().item())
        optimizer.step()
    assert norms[0] > 0 and max(norms) / min(norms) < 10, norms


def test_soft_deflection_reports_auxiliary_loss(s2_reflectance: torch.Tensor) -> None:
    adapted = adapt(deflection="soft", lambda_deflection=2.0)
    adapted.train()
    adapted(s2_reflectance)
    aux = adapted.auxiliary_losses()
    assert set(aux) == {"deflection"} and aux["deflection"].item() == pytest.approx(0, abs=1e-5)
    perturb(adapted)
    adapted(s2_reflectance)
    loss = adapted.auxiliary_losses()["deflection"]
    assert loss.item() > 0 and loss.requires_grad
    adapted.eval()
    adapted(s2_reflectance)
    assert adapted.auxiliary_losses() == {}
    hard = adapt().train()
    hard(s2_reflectance)
    assert hard.auxiliary_losses() == {}


def test_state_is_cleared_and_calls_repeat(s2_reflectance: torch.Tensor) -> None:
    adapted = adapt()
    perturb(adapted)
    with torch.no_grad():
        first = adapted(s2_reflectance)
        second = adapted(s2_reflectance)
        other = adapted(s2_reflectance.flip(-1))
    assert torch.equal(first, second) and not torch.allclose(first, other)
    state = adapted.tuner.state
    assert state._tokens is None and state._pending is None and state._finish is None
    with pytest.raises(RuntimeError, match="without a spectral stream"):
        adapted.base_model.blocks[1](torch.zeros(1, 17, 32))


def test_bf16_autocast_forward_is_close_to_fp32(s2_reflectance: torch.Tensor) -> None:
    adapted = adapt()
    perturb(adapted)
    with torch.no_grad():
        reference = adapted(s2_reflectance)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = adapted(s2_reflectance)
    assert torch.isfinite(out.float()).all()
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_two_training_forwards_then_one_backward(s2_reflectance: torch.Tensor) -> None:
    adapted = adapt().train()
    perturb(adapted)
    (adapted(s2_reflectance).sum() + adapted(s2_reflectance.flip(-1)).sum()).backward()
    grads = [p.grad for p in adapted.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
