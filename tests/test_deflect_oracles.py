"""DEFLECT against an independent re-implementation of docs/method.md's formulas, with non-zero adapter
weights (``docs/method.md``, sections 1-3).

The reference below is written from docs/method.md in numpy (float64) and plain torch, and calls none
of the project's functions: spyndex computes the indices, numpy's NaN-aware reductions the
pixel-set statistics over valid pixels, an explicit softmax the attention. Only the weights are
read from the adapted model.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import spyndex
import torch

from deflect import DataSpec, DeflectConfig, DeflectModel, get_deflect_model
from deflect.tuners.deflect.layer import DeflectBlock
from tests.conftest import S2_BANDS, tiny_timm_vit

SYMBOLS = {"B1": "A", "B2": "B", "B3": "G", "B4": "R", "B5": "RE1", "B6": "RE2", "B7": "RE3",
           "B8": "N", "B8A": "N2", "B11": "S1", "B12": "S2"}  # fmt: skip
INDICES = ["NDVI", "NDWI", "EVI", "NBR", "FAI"]
STATS = ["mean", "std", "min", "max", "q10", "q25", "q75", "q90"]
QUANTILES = {"q10": 0.1, "q25": 0.25, "q75": 0.75, "q90": 0.9}
NODATA = -9999.0
P = 8  # patch size of the tiny ViT


def spec() -> DataSpec:
    """Reflectance x10000 with a no-data value, as an L2A product."""
    return DataSpec(
        bands=tuple(S2_BANDS),
        mean={b: 1000.0 + 50 * i for i, b in enumerate(S2_BANDS)},
        std={b: 400.0 + 20 * i for i, b in enumerate(S2_BANDS)},
        reflectance_scale=10000.0,
        nodata=NODATA,
    )


def batch(data: DataSpec) -> torch.Tensor:
    """Normalised input with the invalid pixels docs/method.md lists: a no-data pixel, NaN in every
    band, NaN in one band only (B8), and one patch without any valid pixel."""
    rng = np.random.default_rng(0)
    refl = rng.uniform(0.03, 0.5, size=(2, len(S2_BANDS), 32, 32))
    refl[:, S2_BANDS.index("B2")] *= 0.2  # keeps EVI's denominator away from 0
    stored = refl * data.reflectance_scale
    stored[0, :, 3, 5] = NODATA  # a no-data pixel in every band
    stored[1, :, 20, 9] = np.nan  # NaN in every band
    stored[0, S2_BANDS.index("B8"), 12, 30] = np.nan  # NaN in B8 only: NIR indices undefined
    stored[1, :, 8:16, 16:24] = np.nan  # patch (1, 2): no valid pixel at all
    mean = np.array(data.mean_list())[None, :, None, None]
    std = np.array(data.std_list())[None, :, None, None]
    return torch.from_numpy(((stored - mean) / std).astype(np.float32))


# ---- the reference, from docs/method.md ----------------------------------------------------------
def reference_pixel_features(x: np.ndarray, data: DataSpec, clamp: float = 10.0) -> np.ndarray:
    """Section 1.1 and 1.7: raw normalised bands and spyndex indices of the reflectance; NaN
    wherever a pixel is invalid (no-data, NaN) for that feature."""
    mean = np.array(data.mean_list())[None, :, None, None]
    std = np.array(data.std_list())[None, :, None, None]
    stored = x * std + mean
    valid = np.isfinite(stored) & ~np.isclose(stored, data.nodata, rtol=0, atol=1e-2)
    reflectance = np.where(valid, stored / data.reflectance_scale, np.nan)
    params = {SYMBOLS[b]: reflectance[:, i] for i, b in enumerate(S2_BANDS)}
    params |= {c: spyndex.constants[c].default for c in ("g", "C1", "C2", "L")}
    params |= {f"lambda{s}": spyndex.bands[s].sentinel2a.wavelength
               for s in ("N", "R", "S1", "G", "S2", "N2")}  # fmt: skip
    features = [np.where(valid, x, np.nan)]
    for name in INDICES:
        needed = spyndex.indices[name].bands
        value = spyndex.computeIndex(name, params={k: params[k] for k in needed})
        features.append(np.clip(value, -clamp, clamp)[:, None])
    return np.concatenate(features, axis=1)  # (B, F, H, W)


def reference_statistics(features: np.ndarray) -> np.ndarray:
    """Section 1.2: per patch and feature, statistics over the valid pixels (0 if none)."""
    b, f, h, w = features.shape
    patches = features.reshape(b, f, h // P, P, w // P, P).transpose(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, (h // P) * (w // P), f, P * P)  # tokens row-major
    out = np.zeros((b, patches.shape[1], f, len(STATS)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
        for s, name in enumerate(STATS):
            if name in QUANTILES:
                value = np.nanquantile(patches, QUANTILES[name], axis=-1, method="linear")
            else:
                value = {"mean": np.nanmean, "std": np.nanstd, "min": np.nanmin,
                         "max": np.nanmax}[name](patches, axis=-1)  # fmt: skip
            out[..., s] = np.nan_to_num(value, nan=0.0)
    return out.reshape(b, -1, f * len(STATS))  # feature-major


def linear(x: np.ndarray, layer: torch.nn.Linear) -> np.ndarray:
    w = layer.weight.detach().double().numpy()
    bias = 0 if layer.bias is None else layer.bias.detach().double().numpy()
    return x @ w.T + bias


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def reference_spectral_stream(x, data, upe, x_p: np.ndarray, cls: str = "mean") -> np.ndarray:
    """Sections 1.3-1.6: LayerNorm without affine, projection, T, norm matching, spectral CLS."""
    s = reference_statistics(reference_pixel_features(x, data))
    s = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-5)
    e = linear(s, upe.projection)
    t = e + linear(gelu(linear(e, upe.spectral_map.fc1)), upe.spectral_map.fc2)
    geometry = np.linalg.norm(x_p, axis=-1, keepdims=True)  # (B, 1+N, 1)
    t = t * geometry[:, 1:] / np.linalg.norm(t, axis=-1, keepdims=True)  # norm matching
    if cls == "mean":
        spectral_cls = t.mean(axis=1, keepdims=True)  # mean of the matched patch tokens
    else:
        c = upe.cls_token.detach().double().numpy()[None, None]
        spectral_cls = c * geometry[:, :1] / np.linalg.norm(c)
    return np.concatenate([spectral_cls, t], axis=1)


def layer_norm(x: np.ndarray, norm: torch.nn.LayerNorm) -> np.ndarray:
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    w, b = norm.weight.detach().double().numpy(), norm.bias.detach().double().numpy()
    return (x - mu) / np.sqrt(var + norm.eps) * w + b


def heads(x: np.ndarray, h: int) -> tuple[np.ndarray, ...]:
    b, t, three_d = x.shape
    x = x.reshape(b, t, 3, h, three_d // (3 * h)).transpose(2, 0, 3, 1, 4)
    return x[0], x[1], x[2]  # (B, h, T, d)


def attention(q, k, v, tau: float) -> np.ndarray:
    logits = tau * q @ k.transpose(0, 1, 3, 2)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = weights @ v  # (B, h, T, d)
    b, h, t, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def layer_scale(block, name: str) -> np.ndarray:
    """The block's LayerScale γ ``ls1``/``ls2`` (float64), or 1 where it has none."""
    gamma = getattr(getattr(block, name, None), "gamma", None)
    return 1.0 if gamma is None else gamma.detach().double().numpy()


def reference_block(block, uatt, x, spectral, deflection, temperature, lam=1.0):
    """Sections 2-3: uAtt with spectral q, k and v, both updates through LayerScale (γ ⊙ δ:
    what each would add to the stream), deflection of those, frozen MLP (γ₂ ⊙ mlp). Returns
    the block output and the soft-deflection loss term."""
    h = block.attn.num_heads
    u = layer_norm(x, block.norm1)
    q_p, k_p, v_p = heads(linear(u, block.attn.qkv), h)
    spectral_qkv = linear(linear(spectral, uatt.V), uatt.U)  # U_ℓ V_ℓ x̃_A
    q_a, k_a, v_a = heads(spectral_qkv, h)
    d = q_p.shape[-1]
    tau = 1 / math.sqrt(d) if temperature == "sqrt_d" else 1 / math.sqrt(2 * d)
    delta_rgb = linear(attention(q_p, k_p, v_p, 1 / math.sqrt(d)), block.attn.proj)
    delta_uatt = linear(attention(q_p + q_a, k_p + k_a, v_p + v_a, tau), block.attn.proj)
    delta_rgb, delta_uatt = (
        layer_scale(block, "ls1") * delta_rgb,
        layer_scale(block, "ls1") * delta_uatt,
    )
    n_uatt = np.linalg.norm(delta_uatt, axis=-1, keepdims=True)
    n_rgb = np.linalg.norm(delta_rgb, axis=-1, keepdims=True)
    delta = n_rgb * delta_uatt / n_uatt if deflection == "hard" else delta_uatt
    loss = lam * np.mean(np.abs(n_uatt - n_rgb) / n_uatt)
    if deflection == "embedding":  # the token, not the update, keeps the frozen block's length
        turned = x + delta_uatt
        x = (
            np.linalg.norm(x + delta_rgb, axis=-1, keepdims=True)
            * turned
            / np.linalg.norm(turned, axis=-1, keepdims=True)
        )
    else:
        x = x + delta
    mlp = block.mlp
    x = x + layer_scale(block, "ls2") * linear(gelu(linear(layer_norm(x, block.norm2), mlp.fc1)),
                                               mlp.fc2)  # fmt: skip
    return x, loss


def reference_forward(adapted, x: torch.Tensor, data, config: DeflectConfig):
    """The adapted tiny ViT's ``forward_features`` (all tokens, final norm) and soft loss."""
    vit = adapted.base_model
    embed = vit.patch_embed.base_layer
    upe = vit.patch_embed.deflect_upe["default"]
    rgb = torch.nan_to_num(x[:, [S2_BANDS.index(b) for b in ("B4", "B3", "B2")]], nan=0.0)
    conv = torch.nn.functional.conv2d(rgb.double(), embed.proj.weight.double(),
                                      embed.proj.bias.double(), stride=P)  # fmt: skip
    tokens = conv.flatten(2).transpose(1, 2).numpy()
    cls = vit.cls_token.detach().double().numpy().repeat(len(x), axis=0)
    stream = np.concatenate([cls, tokens], axis=1) + vit.pos_embed.detach().double().numpy()
    spectral = reference_spectral_stream(x.double().numpy(), data, upe, stream, config.cls_token)
    losses = []
    for block in vit.blocks:
        if isinstance(block, DeflectBlock) and "default" in block.deflect_uatt:
            stream, loss = reference_block(
                block.base_layer, block.deflect_uatt["default"], stream, spectral,
                config.deflection, config.temperature, config.lambda_deflection,
            )  # fmt: skip
            losses.append(loss)
        else:
            base = block.base_layer if isinstance(block, DeflectBlock) else block
            with torch.no_grad():
                stream = base(torch.from_numpy(stream).float()).double().numpy()
    return layer_norm(stream, vit.norm), float(np.mean(losses))


def adapt(config: DeflectConfig, **vit_kwargs):
    """The tiny timm ViT (``vit_kwargs``: e.g. ``init_values`` for LayerScale, whose γ then
    gets trained-looking per-channel values 0.05-2) adapted, with random adapter weights."""
    data = spec()
    torch.manual_seed(3)
    adapted = get_deflect_model(tiny_timm_vit(**vit_kwargs), config, data=data)
    torch.manual_seed(4)
    with torch.no_grad():  # non-zero adapter weights everywhere (U_ℓ starts at zero)
        for name, p in adapted.named_parameters():
            if "deflect_" in name:
                p.normal_(0, 0.4 if name.endswith("U.weight") else 0.2)
            elif name.endswith("gamma"):
                p.uniform_(0.05, 2.0)
    return adapted, data


@pytest.mark.parametrize(
    "config",
    [
        DeflectConfig(indices=INDICES, deflection="hard"),
        DeflectConfig(indices=INDICES, deflection="none", target_blocks=[1, 2]),
        DeflectConfig(indices=INDICES, deflection="soft", temperature="sqrt_2d", cls_token="learned",
                      lambda_deflection=0.7),
        DeflectConfig(indices=INDICES, deflection="embedding", target_blocks=[0, 3]),
    ],
    ids=["hard", "none", "soft-sqrt2d-learned", "embedding"],
)  # fmt: skip
@pytest.mark.parametrize("init_values", [None, 0.1], ids=["plain", "layerscale"])
def test_adapted_vit_equals_the_spec_formulas(config, init_values):
    """With LayerScale (a DINOv2-style block), the constraints hold on γ ⊙ δ, what the block
    adds: hard deflection constrained before LayerScale misses that length."""
    adapted, data = adapt(config, init_values=init_values)
    x = batch(data)
    expected, soft_loss = reference_forward(adapted, x, data, config)
    adapted.train()  # no dropout in the tiny ViT; training mode reports the soft loss
    got = adapted.forward_features(x)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.detach().double().numpy(), expected, rtol=1e-4, atol=2e-4)
    if config.deflection == "embedding":  # the adapter acts: far from the frozen model
        with adapted.disable_adapter():
            base = adapted.forward_features(x).detach().double().numpy()
        assert np.abs(base - expected).max() > 0.1
    aux = adapted.auxiliary_losses()
    if config.deflection == "soft":
        assert aux["deflection"].item() == pytest.approx(soft_loss, rel=1e-4)
        assert soft_loss > 1e-3  # the adapter acts: the constraint is not trivially met
    else:
        assert aux == {}


def test_spectral_stream_equals_the_spec_formulas():
    """UPE alone: valid-pixel statistics, norm matching of the patch tokens to x_P, and the CLS
    as the mean of the matched patch tokens (not matched again)."""
    adapted, data = adapt(DeflectConfig(indices=INDICES))
    upe = adapted.base_model.patch_embed.deflect_upe["default"]
    x = batch(data)
    torch.manual_seed(9)
    x_p = torch.randn(2, 17, 32) * torch.linspace(0.5, 3, 17)[None, :, None]
    got = upe.finish(upe(x), x_p, num_prefix=1).detach().double().numpy()
    expected = reference_spectral_stream(x.double().numpy(), data, upe, x_p.double().numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # The patch tokens carry x_P's norms; the CLS is their mean, so its norm is smaller.
    norms = np.linalg.norm(got, axis=-1)
    np.testing.assert_allclose(norms[:, 1:], x_p[:, 1:].norm(dim=-1).numpy(), rtol=1e-5)
    assert (norms[:, 0] < x_p[:, 1:].norm(dim=-1).max(dim=1).values.numpy()).all()


def test_statistics_leave_invalid_pixels_out():
    """The pixel-set statistics of the project equal numpy's NaN-aware ones over valid pixels,
    and a patch without a valid pixel gets zero statistics."""
    adapted, data = adapt(DeflectConfig(indices=INDICES))
    upe = adapted.base_model.patch_embed.deflect_upe["default"]
    x = batch(data)
    from deflect.tuners.deflect.upe import pixel_set_statistics

    features, valid = upe.pixel_features(x)
    got = pixel_set_statistics(features, P, STATS, valid).double().numpy()
    expected = reference_statistics(reference_pixel_features(x.double().numpy(), data))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert (got[1, 1 * 4 + 2] == 0).all()  # patch (1, 2) of sample 1: nothing valid
    # The no-data pixel is not a value of the statistics: B2's min of that patch is the min of
    # the other 63 pixels, not the no-data value's normalised -11.
    assert got[0, 0, STATS.index("min")] > -3


def test_nan_pixels_do_not_spread():
    """One NaN pixel through the library API leaves every output finite and changes only what
    docs/method.md says it may (its patch's statistics and, through attention, the tokens)."""
    adapted, data = adapt(DeflectConfig(indices=INDICES))
    x = batch(data)[:1]
    x[:, :, 3, 5] = 0.3  # make sample 0 fully valid
    clean = adapted.forward_features(x)
    dirty = x.clone()
    dirty[0, :, 27, 27] = float("nan")
    out = adapted.forward_features(dirty)
    assert torch.isfinite(out).all() and torch.isfinite(clean).all()
    upe = adapted.base_model.patch_embed.deflect_upe["default"]
    tokens_clean, tokens_dirty = upe(x), upe(dirty)
    changed = (tokens_clean - tokens_dirty).abs().amax(dim=-1)[0]  # (N,)
    assert changed[3 * 4 + 3] > 0 and changed[: 3 * 4 + 3].eq(0).all()  # only patch (3, 3)


FP32 = {"rtol": 1e-5, "atol": 1e-5}  # float32 computations compared in float64


def attention_step(adapted, x: torch.Tensor, seed: int, adapter: bool = True):
    """Input and output of ``blocks[0]`` in training mode, from ``torch.manual_seed(seed)``:
    the adapted block, or (``adapter=False``) the frozen block it wraps."""
    seen = {}
    block = adapted.base_model.blocks[0]
    hook = block.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    adapted.train()
    torch.manual_seed(seed)
    if adapter:
        adapted.forward_features(x)
    else:
        with adapted.disable_adapter():
            adapted.forward_features(x)
    hook.remove()
    return seen["x"].detach().double(), seen["out"].detach().double()


@pytest.mark.parametrize("deflection", ["hard", "embedding"])
def test_proj_drop_masks_both_updates_alike_and_layerscale_comes_before_the_constraint(
    deflection,
):
    """A DINOv2-style ViT (LayerScale, ``proj_drop_rate`` 0.5) in training, block 0's MLP set
    to 0 so its output is x + the attention update. The frozen block, run from the same seed,
    draws the dropout mask m: its update is γ ⊙ m ⊙ δ_RGB, zero exactly where m is. The adapted
    block draws the same mask for both updates: its update is zero there too, and its length
    (hard) or the token's (embedding) is the frozen block's, dropout included. At
    initialisation (U_ℓ = 0) the adapted block IS the frozen one, also in training."""
    config = DeflectConfig(indices=INDICES, deflection=deflection, target_blocks=[0])
    adapted, data = adapt(config, init_values=0.1, proj_drop_rate=0.5)
    mlp = adapted.base_model.blocks[0].base_layer.mlp
    with torch.no_grad():
        mlp.fc2.weight.zero_()
        mlp.fc2.bias.zero_()
    x = torch.nan_to_num(batch(data), nan=0.0)
    x0, frozen = attention_step(adapted, x, seed=5, adapter=False)
    x1, out = attention_step(adapted, x, seed=5)
    assert torch.equal(x0, x1)
    dropped = (frozen - x0) == 0  # m = 0: about half of the channels
    assert 0.3 < dropped.double().mean() < 0.7
    assert not torch.allclose(out, frozen, atol=1e-3)  # the adapter acts
    if deflection == "hard":
        assert ((out - x1)[dropped] == 0).all()
        torch.testing.assert_close((out - x1).norm(dim=-1), (frozen - x0).norm(dim=-1), **FP32)
    else:  # the token is rescaled as a whole: where m = 0, out = s x with one s per token
        torch.testing.assert_close(out.norm(dim=-1), frozen.norm(dim=-1), **FP32)
        ratio = torch.where(dropped, out / x1, torch.nan)
        spread = ratio.nan_to_num(0).amax(-1) - ratio.nan_to_num(1e9).amin(-1)
        assert (spread.abs() < 1e-4).all()
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("U.weight"):
                p.zero_()
    _, start = attention_step(adapted, x, seed=5)
    torch.testing.assert_close(start, frozen, **FP32)


def test_standardised_features_use_the_training_pixels_statistics_only(tmp_path):
    """``standardise_features``: after two training batches every feature's statistics are
    numpy's mean and (population) std over the valid pixels of both batches (the reference
    features above: spyndex indices, NaN where invalid); an evaluation batch leaves them as
    they are; features are then (f - mean) / std at valid pixels and 0 elsewhere. Off (the
    default): no statistics, the features unchanged."""
    adapted, data = adapt(DeflectConfig(indices=INDICES, standardise_features=True))
    upe = adapted.base_model.patch_embed.deflect_upe["default"]
    first = batch(data)
    second = first.flip(-1) * 0.7 + 0.1  # other values, the same invalid pixels mirrored
    adapted.train()
    upe(first)
    upe(second)
    pooled = np.concatenate([reference_pixel_features(b.double().numpy(), data)
                             for b in (first, second)])  # fmt: skip
    flat = pooled.transpose(1, 0, 2, 3).reshape(pooled.shape[1], -1)  # (F, pixels)
    mean, std = np.nanmean(flat, axis=1), np.nanstd(flat, axis=1)
    np.testing.assert_allclose(upe.feature_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        (upe.feature_m2 / upe.feature_count).sqrt().numpy(), std, rtol=1e-4, atol=1e-6
    )
    assert upe.feature_count.tolist() == np.isfinite(flat).sum(axis=1).tolist()
    adapted.eval()
    before = upe.feature_mean.clone()
    upe(first * 3)
    assert torch.equal(upe.feature_mean, before)
    got, valid = upe.pixel_features(first)
    expected = (reference_pixel_features(first.double().numpy(), data)
                - mean[None, :, None, None]) / std[None, :, None, None]  # fmt: skip
    assert np.array_equal(valid.numpy(), np.isfinite(expected))
    np.testing.assert_allclose(got.numpy(), np.nan_to_num(expected, nan=0.0), rtol=1e-3,
                               atol=1e-4)  # fmt: skip
    adapted.save_pretrained(tmp_path)  # the statistics are part of the adapter
    loaded = DeflectModel.from_pretrained(tiny_timm_vit(), tmp_path)
    reloaded = loaded.base_model.patch_embed.deflect_upe["default"]
    assert torch.equal(reloaded.feature_mean, upe.feature_mean)
    assert torch.equal(reloaded.feature_m2, upe.feature_m2)
    plain, _ = adapt(DeflectConfig(indices=INDICES))
    upe_plain = plain.base_model.patch_embed.deflect_upe["default"]
    assert "feature_mean" not in dict(upe_plain.named_buffers())
    raw = np.nan_to_num(reference_pixel_features(first.double().numpy(), data), nan=0.0)
    np.testing.assert_allclose(upe_plain.pixel_features(first)[0].numpy(), raw, rtol=1e-4,
                               atol=1e-4)  # fmt: skip
