"""Prithvi-100M and Prithvi-EO-2.0: the 3-D positional table against the release's recipe,
checkpoints in both release layouts, the TL embeddings, the forward pass against a hand-built
one, every tuner on it, and the parameter counts of the published architectures."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from deflect import DeflectModel, get_deflect_model
from deflect.encoders import PRITHVI_BANDS, PrithviEncoder
from deflect.encoders.prithvi import sincos_3d_pos_embed
from tests.conftest import S2_BANDS, s2_spec
from tests.test_tuner_matrix import ROWS, deflect_count, lora_count, norm_count, slr_scales

D, DEPTH, HEADS, P, IMG = 32, 4, 4, 8, 32
GRID = IMG // P


def tiny(frames: int = 1, **kwargs) -> PrithviEncoder:
    torch.manual_seed(0)
    kwargs.setdefault("data", s2_spec())
    kwargs.setdefault("output_layers", [1, 3])
    with warnings.catch_warnings():
        if not kwargs.get("checkpoint"):
            warnings.simplefilter("ignore")  # the random-weights warning
        encoder = PrithviEncoder(
            "tiny_prithvi", img_size=IMG, patch_size=P, num_frames=frames, embed_dim=D,
            depth=DEPTH, num_heads=HEADS, **kwargs,
        )  # fmt: skip
    return encoder.eval()


# ---- the 3-D sine-cosine table, by the release's numpy recipe --------------------------------------
def oracle_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=float) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(float), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def oracle_3d(dim: int, t: int, h: int, w: int) -> np.ndarray:
    """w: 6/16 of the width, h: 6/16, t: 4/16; tiled frame-major then row-major."""
    w_emb = np.tile(oracle_1d(dim // 16 * 6, np.arange(w)), (t * h, 1))
    h_emb = np.tile(np.repeat(oracle_1d(dim // 16 * 6, np.arange(h)), w, axis=0), (t, 1))
    t_emb = np.repeat(oracle_1d(dim // 16 * 4, np.arange(t)), h * w, axis=0)
    return np.concatenate([w_emb, h_emb, t_emb], axis=1)


def test_3d_positional_table_follows_the_release_recipe():
    np.testing.assert_allclose(sincos_3d_pos_embed(64, (3, 4, 5)).numpy(), oracle_3d(64, 3, 4, 5),
                               atol=1e-12)  # fmt: skip
    encoder = tiny()
    table = encoder.vit.pos_embed[0].double()
    assert torch.equal(table[0], torch.zeros(D, dtype=torch.float64))  # CLS: zero
    np.testing.assert_allclose(table[1:].numpy(), oracle_3d(D, 1, GRID, GRID), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 16"):
        sincos_3d_pos_embed(40, (1, 2, 2))


# ---- release checkpoints -------------------------------------------------------------------------
def block_tensors(prefix: str, i: int, rng: torch.Generator) -> dict[str, torch.Tensor]:
    """One timm Block as released: names and shapes written out, not taken from the model."""
    shapes = {
        "norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D),
        "attn.qkv.bias": (3 * D,), "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
        "norm2.weight": (D,), "norm2.bias": (D,), "mlp.fc1.weight": (4 * D, D),
        "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,),
    }  # fmt: skip
    return {f"{prefix}blocks.{i}.{k}": torch.randn(s, generator=rng) for k, s in shapes.items()}


def release_state(prefix: str, frames: int, decoder: dict[str, tuple]) -> dict[str, torch.Tensor]:
    rng = torch.Generator().manual_seed(1)
    table = np.concatenate([np.zeros((1, D)), oracle_3d(D, frames, GRID, GRID)])
    state = {
        f"{prefix}cls_token": torch.randn(1, 1, D, generator=rng),
        f"{prefix}pos_embed": torch.from_numpy(table).float()[None],
        f"{prefix}patch_embed.proj.weight": torch.randn(D, 6, 1, P, P, generator=rng),
        f"{prefix}patch_embed.proj.bias": torch.randn(D, generator=rng),
        f"{prefix}norm.weight": torch.ones(D),
        f"{prefix}norm.bias": torch.zeros(D),
    }
    for i in range(DEPTH):
        state.update(block_tensors(prefix, i, rng))
    state.update({k: torch.zeros(s) for k, s in decoder.items()})
    return state


V1_DECODER = {
    "mask_token": (1, 1, 16), "decoder_embed.weight": (16, D), "decoder_embed.bias": (16,),
    "decoder_pos_embed": (1, 1 + 3 * GRID * GRID, 16), "decoder_blocks.0.attn.qkv.weight": (48, 16),
    "decoder_norm.weight": (16,), "decoder_pred.weight": (6 * P * P, 16),
}  # fmt: skip


def assert_every_encoder_weight_loaded(encoder: PrithviEncoder, state: dict, prefix: str) -> None:
    loaded = encoder.vit.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, state[prefix + key]), key


def test_prithvi_100m_release_layout_loads_with_the_decoder_listed(tmp_path):
    """Prithvi_100M.pt: a plain state dict with a 3-frame table and the MAE decoder."""
    state = release_state("", frames=3, decoder=V1_DECODER)
    torch.save(state, tmp_path / "Prithvi_100M.pt")
    with pytest.warns(UserWarning) as record:
        encoder = tiny(checkpoint=str(tmp_path / "Prithvi_100M.pt"))
    message = "\n".join(str(w.message) for w in record)
    assert "dropped 7 checkpoint keys" in message
    assert all(key in message for key in V1_DECODER)
    assert "missing" not in message
    assert_every_encoder_weight_loaded(encoder, state, "")
    # The released table's first frame is the one recomputed for a single frame.
    torch.testing.assert_close(encoder.vit.pos_embed, state["pos_embed"][:, : 1 + GRID * GRID])


def test_prithvi_eo2_tl_release_layout_loads_the_coordinate_scales(tmp_path):
    """Prithvi_EO_V2_300M_TL.pt: ``encoder.*`` with the TL scales and ``decoder.*``."""
    decoder = {
        "decoder.mask_token": (1, 1, 16),
        "decoder.decoder_embed.weight": (16, D),
        "decoder.temporal_embed_dec.scale": (1,),
        "decoder.decoder_pred.weight": (384, 16),
    }
    state = release_state("encoder.", frames=4, decoder=decoder)
    state["encoder.temporal_embed_enc.scale"] = torch.tensor([0.37])
    state["encoder.location_embed_enc.scale"] = torch.tensor([0.21])
    torch.save(state, tmp_path / "Prithvi_EO_V2_300M_TL.pt")
    with pytest.warns(UserWarning, match="decoder.temporal_embed_dec.scale"):
        encoder = tiny(checkpoint=str(tmp_path / "Prithvi_EO_V2_300M_TL.pt"),
                       coords_encoding=["time", "location"], coords_scale_learn=True)  # fmt: skip
    assert_every_encoder_weight_loaded(encoder, state, "encoder.")
    assert encoder.vit.temporal_embed_enc.scale.item() == pytest.approx(0.37)
    assert encoder.metadata_keys == ("temporal_coords", "location_coords")


def test_a_checkpoint_of_another_width_is_a_clear_error(tmp_path):
    state = release_state("", frames=3, decoder={})
    state["patch_embed.proj.weight"] = torch.zeros(D, 6, 1, 16, 16)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(
        ValueError, match=r"patch_embed.proj.weight: checkpoint \(32, 6, 1, 16, 16\)"
    ):
        tiny(checkpoint=str(tmp_path / "other.pt"))


# ---- the forward pass ----------------------------------------------------------------------------
def hand_forward(encoder: PrithviEncoder, x: torch.Tensor, extra: torch.Tensor | None = None):
    """Conv3d on the six bands picked by name, + the oracle table (+ extra on patches), CLS,
    the blocks; maps of each frame stacked on channels."""
    vit, b = encoder.vit, x.shape[0]
    video = x if x.ndim == 5 else x[:, :, None]
    picked = video[:, [S2_BANDS.index(band) for band in PRITHVI_BANDS]]
    frames = video.shape[2]
    tokens = torch.nn.functional.conv3d(picked, vit.patch_embed.proj.weight,
                                        vit.patch_embed.proj.bias, stride=(1, P, P))  # fmt: skip
    tokens = tokens.flatten(2).transpose(1, 2)  # (B, T*h*w, D)
    tokens = tokens + torch.from_numpy(oracle_3d(D, frames, GRID, GRID)).float()
    if extra is not None:
        tokens = tokens + extra
    h = torch.cat([vit.cls_token.expand(b, -1, -1), tokens], dim=1)
    outs = []
    for i, block in enumerate(vit.blocks):
        h = block(h)
        if i in encoder.output_layers:
            maps = h[:, 1:].reshape(b, frames, GRID * GRID, D).transpose(2, 3)
            outs.append(maps.reshape(b, frames * D, GRID, GRID))
    return outs


@pytest.mark.parametrize("frames", [1, 2])
def test_forward_equals_a_hand_built_one(frames):
    encoder = tiny(frames=frames)
    torch.manual_seed(3)
    x = torch.randn(2, len(S2_BANDS), *([frames] if frames > 1 else []), IMG, IMG)
    with torch.no_grad():
        got, expected = encoder(x), hand_forward(encoder, x)
    assert [o.shape for o in got] == [(2, frames * D, GRID, GRID)] * 2
    assert encoder.out_channels == [frames * D] * 2
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if frames == 1:
        with pytest.raises(ValueError, match="num_frames=1"):
            encoder(x[:, :, None].expand(-1, -1, 3, -1, -1))


def test_temporal_and_location_embeddings_add_to_every_patch_token():
    """scale · [sincos_{D/2}(year), sincos_{D/2}(day)] and the same of (lat, lon), on patch
    tokens only (the CLS token keeps its zero position)."""
    encoder = tiny(coords_encoding=["time", "location"], coords_scale_learn=True)
    with torch.no_grad():
        encoder.vit.temporal_embed_enc.scale.fill_(0.5)  # the location scale stays 0.1
    torch.manual_seed(4)
    x = torch.randn(2, len(S2_BANDS), IMG, IMG)
    time = torch.tensor([[2018.0, 190.0], [2021.0, 3.0]])
    place = torch.tensor([[36.14, -119.5], [-3.2, 15.0]])

    def embed(coords: torch.Tensor, scale: float) -> np.ndarray:
        first, second = coords[:, 0].numpy(), coords[:, 1].numpy()
        return scale * np.concatenate([oracle_1d(D // 2, first), oracle_1d(D // 2, second)], 1)

    extra = torch.from_numpy(embed(time, 0.5) + embed(place, 0.1)).float()[:, None]  # (B, 1, D)
    with torch.no_grad():
        got = encoder(x, temporal_coords=time, location_coords=place)
        expected = hand_forward(encoder, x, extra)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.warns(UserWarning, match="no location_coords"), torch.no_grad():
        only_time = encoder(x, temporal_coords=time)
    expected = hand_forward(encoder, x, torch.from_numpy(embed(time, 0.5)).float()[:, None])
    torch.testing.assert_close(only_time[0], expected[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="gsd"):
        encoder(x, gsd=torch.ones(2))


def test_unknown_coords_encoding_and_missing_bands_are_named():
    with pytest.raises(ValueError, match=r"coords_encoding \['season'\]"):
        tiny(coords_encoding=["season"])
    with pytest.raises(ValueError, match="B8A"):
        tiny(data=s2_spec(["B2", "B3", "B4", "B8", "B11", "B12"]))


# ---- every tuner on Prithvi ----------------------------------------------------------------------
def prithvi_full_count() -> int:
    """Patch conv (6 bands x 1 x P x P + bias), CLS, blocks; no positional parameter, no norm."""
    block = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D)
    return 6 * P * P * D + D + D + DEPTH * block


COUNTS = {
    "frozen": 0, "full": prithvi_full_count(),
    "bitfit": DEPTH * 11 * D + D, "norm_tuning": norm_count(False),
    "lora": lora_count(16), "scaled_lora": lora_count(16) + slr_scales(),
    "deflect": deflect_count(False), "lora_rgb_random": lora_count(2) + D * 11 * P * P,
    "spectral_kernel": D * 11 * P * P,
}  # fmt: skip
OTHERS = [b for b in S2_BANDS if b not in PRITHVI_BANDS]


def zero_others(x: torch.Tensor) -> torch.Tensor:
    keep = torch.tensor([b in PRITHVI_BANDS for b in S2_BANDS])
    return x * keep[None, :, None, None]


def repeat_input(x: torch.Tensor) -> torch.Tensor:
    """``repeat`` by hand: B1, B5, B6, B7, B8 go to the Prithvi slices in turn (B2, B3, B4,
    B8A, B11); each slice sees 6/11 of the sum of its bands."""
    groups = {b: [b] for b in PRITHVI_BANDS}
    for i, band in enumerate(OTHERS):
        groups[PRITHVI_BANDS[i % 6]].append(band)
    out = torch.zeros_like(x)
    for band, members in groups.items():
        out[:, S2_BANDS.index(band)] = sum(x[:, S2_BANDS.index(m)] for m in members) * 6 / 11
    return out


INIT = {
    "lora_rgb_random": (zero_others, zero_others),
    "spectral_kernel": (zero_others, zero_others),
    "bitfit_repeat": (lambda x: x, repeat_input),
    "frozen_repeat": (lambda x: x, repeat_input),
    "full_repeat": (lambda x: x, repeat_input),
}


@pytest.mark.parametrize("method", sorted(ROWS))
def test_every_tuner_on_prithvi(method, tmp_path):
    """Identity at initialisation (band strategies: against their hand-made input), the count
    of what trains, frozen weights untouched by training, and a save/load round trip."""
    base = tiny()
    reference = copy.deepcopy(base)
    torch.manual_seed(5)
    model = get_deflect_model(base, ROWS[method].config())
    torch.manual_seed(2)
    x = torch.randn(2, len(S2_BANDS), IMG, IMG)
    adapted_input, base_input = INIT.get(method, (lambda v: v, lambda v: v))
    with torch.no_grad():
        for a, b in zip(model(adapted_input(x)), reference(base_input(x))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if method in COUNTS:
        assert model.num_adapter_parameters() == COUNTS[method]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        optimizer = torch.optim.Adam(params, lr=1e-2)
        model.train()
        for _ in range(2):
            loss = sum((o - 0.3).square().mean() for o in model(x))
            loss = loss + sum(model.auxiliary_losses().values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.save_pretrained(tmp_path)
    loaded = DeflectModel.from_pretrained(tiny(), tmp_path)
    with torch.no_grad():
        for a, b in zip(loaded(x), model(x)):
            assert torch.equal(a, b)


def test_deflect_geometry_stream_is_the_six_bands_and_spectral_stream_every_band():
    encoder = tiny()
    model = get_deflect_model(encoder, ROWS["deflect"].config())
    layer = encoder.vit.patch_embed
    assert [S2_BANDS[i] for i in layer.pretrained_index] == PRITHVI_BANDS
    assert layer.deflect_upe["default"].bands == S2_BANDS
    torch.manual_seed(6)
    x = torch.randn(2, len(S2_BANDS), IMG, IMG)
    with torch.no_grad():
        before = model(x)
        x[:, S2_BANDS.index("B5")] += 1.0  # a band only the spectral stream reads
        after = model(x)
    torch.testing.assert_close(after[0], before[0])  # U starts at zero: no effect yet ...
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("deflect_uatt.default.U.weight"):
                p.normal_(0, 0.3)
        assert not torch.allclose(model(x)[0], before[0])  # ... and then there is


# ---- the published architectures ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("encoder", "d", "depth", "patch", "extra"),
    [("prithvi_100m", 768, 12, 16, 0), ("prithvi_eo2_300", 1024, 24, 16, 0),
     ("prithvi_eo2_300_tl", 1024, 24, 16, 2), ("prithvi_eo2_600", 1280, 32, 14, 0)],
)  # fmt: skip
def test_parameter_counts_are_the_published_architectures(encoder, d, depth, patch, extra):
    """ViT-B/16 (Prithvi-100M), ViT-L/16 (EO-2.0 300M) or ViT-H/14 (600M) encoder without
    final norm: blocks of 12·D² + 13·D, the 3-D patch embedding 6·1·p·p·D + D, the CLS token,
    and for TL the two learned coordinate scales."""
    from tests.conftest import encoder_on_meta

    built = encoder_on_meta(encoder, depth)
    expected = depth * (12 * d * d + 13 * d) + 6 * patch * patch * d + d + d + extra
    assert sum(p.numel() for p in built.parameters()) == expected
