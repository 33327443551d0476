"""DEFLECT's competitors against independent oracles: LoRA against Hugging Face PEFT's LoRA,
SLR against its formula, weight merging against the unmerged model, ``rank: auto`` against the
hand counts, band strategies in the band table and in errors. (Invariants every method keeps
are in test_tuner_matrix.py.)"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deflect import (
    BitFitConfig,
    DeflectConfig,
    DeflectModel,
    FrozenConfig,
    LoraConfig,
    ScaledLoraConfig,
    get_deflect_model,
)
from deflect.tuners.lora import LoraLinear
from tests.conftest import S2_BANDS, s2_spec, tiny_encoder
from tests.conftest import tiny_timm_vit as tiny_vit

D, DEPTH = 32, 4
RGB = ["B4", "B3", "B2"]


def rgb(x: torch.Tensor) -> torch.Tensor:
    return x[:, [S2_BANDS.index(b) for b in RGB]]


def randomise(model: nn.Module, seed: int = 3) -> None:
    """Give every adapter tensor (B starts at zero, the scales at one) random values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
            elif ".lora_scale_" in name:
                p.uniform_(0.5, 1.5)


# ---- LoRA against PEFT ---------------------------------------------------------------------------
@pytest.mark.parametrize(("rank", "alpha"), [(4, None), (8, 32.0)])
def test_lora_matches_peft_lora_on_the_same_timm_vit(rank, alpha) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tiny_vit()
    targets = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    ours = get_deflect_model(copy.deepcopy(base), LoraConfig(rank=rank, alpha=alpha))
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, lora_dropout=0.0),
        copy.deepcopy(base),
    )
    peft_params = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in ours_params.values()) == sum(
        p.numel() for p in peft_params.values()
    )
    assert sum(p.numel() for p in ours_params.values()) == DEPTH * rank * 16 * D  # by hand
    # The same A and B in both (PEFT names them `<layer>.lora_A.default.weight` too).
    randomise(ours)
    with torch.no_grad():
        for name, p in ours_params.items():
            key = name.replace("base_model.", "", 1)
            peft_params[key].copy_(p)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        # A non-zero B makes a difference (the comparison is not vacuous).
        assert not torch.allclose(ours(x), base(x), atol=1e-3)


# ---- SLR against its formula ---------------------------------------------------------------------
def test_scaled_lora_layer_follows_the_formula() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(6, 5)
    layer = LoraLinear(copy.deepcopy(linear))
    layer.add_adapter("a", rank=2, scaling=1.5, dropout=0.0, scaled=True)
    layer.active_adapter = "a"
    randomise(nn.ModuleDict({"m": layer}))
    s_in, s_out = layer.lora_scale_in["a"].weight, layer.lora_scale_out["a"].weight
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    x = torch.randn(4, 6)
    xs = s_in * x
    expected = s_out * (F.linear(xs, linear.weight, linear.bias) + 1.5 * (xs @ a.T @ b.T))
    torch.testing.assert_close(layer(x), expected)


# ---- merging -------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [LoraConfig(rank=4), ScaledLoraConfig(rank=4, alpha=2.0),
                                    LoraConfig(rank=2, train_norms=True)],  # fmt: skip
                         ids=["lora", "slr", "lora_norms"])  # fmt: skip
def test_merge_gives_the_same_outputs_and_unmerge_the_same_weights(config) -> None:
    encoder = tiny_encoder()
    with torch.no_grad():  # timm starts biases at zero: give SLR's bias scaling something to do
        for name, p in encoder.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model = get_deflect_model(encoder, config)
    randomise(model)
    if config.train_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.split(".")[-2].startswith("norm"):
                    p.add_(0.1)
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    torch.manual_seed(4)
    x = torch.randn(2, len(S2_BANDS), 32, 32)
    with torch.no_grad():
        tuned = torch.cat([o.flatten() for o in model(x)])
        with model.disable_adapter():
            base_out = torch.cat([o.flatten() for o in model(x)])
        model.merge_adapter()
        weights = {n: m.base_layer.weight.clone() for n, m in model.named_modules()
                   if isinstance(m, LoraLinear)}  # fmt: skip
        assert any(not torch.equal(w, before[n.replace("base_model.", "", 1) + ".base_layer.weight"])
                   for n, w in weights.items())  # fmt: skip
        merged = torch.cat([o.flatten() for o in model(x)])
        torch.testing.assert_close(merged, tuned, atol=1e-5, rtol=1e-5)
        with model.disable_adapter():  # a merged adapter is set aside, then folded back
            torch.testing.assert_close(torch.cat([o.flatten() for o in model(x)]), base_out)
        torch.testing.assert_close(torch.cat([o.flatten() for o in model(x)]), merged)
        model.unmerge_adapter()
    after = model.base_model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), [
        k for k in before if not torch.equal(after[k], before[k])
    ]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([o.flatten() for o in model(x)]), tuned)


def test_merge_and_unload_gives_a_plain_model_with_the_adapted_outputs() -> None:
    base = tiny_vit()
    model = get_deflect_model(base, ScaledLoraConfig(rank=3))
    randomise(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tuned = model(x)
        plain = model.merge_and_unload()
        assert plain is base
        assert not any(isinstance(m, LoraLinear) for m in plain.modules())
        assert not any("lora_" in k for k in plain.state_dict())
        torch.testing.assert_close(plain(x), tuned, atol=1e-5, rtol=1e-5)


def test_deflect_cannot_be_merged_and_unloaded() -> None:
    model = get_deflect_model(tiny_encoder(), DeflectConfig())
    with pytest.raises(ValueError, match="acts on activations"):
        model.merge_and_unload()


def test_switching_adapters_while_merged_is_refused() -> None:
    model = get_deflect_model(tiny_vit(), LoraConfig(rank=2), "a")
    model.add_adapter("b", LoraConfig(rank=3))
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        model.set_adapter("b")
    model.unmerge_adapter()
    model.set_adapter("b")
    assert model.num_adapter_parameters() == DEPTH * 3 * 16 * D


# ---- targets -------------------------------------------------------------------------------------
def test_target_modules_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"'attn\.qkvv' matches no module.*blocks\.\*\.attn\.qkv"):
        get_deflect_model(tiny_vit(), LoraConfig(target_modules=["attn.qkvv"]))
    with pytest.raises(ValueError, match=r"not Linear.*patch_embed\.proj \(Conv2d\).*attn\.proj"):
        get_deflect_model(tiny_vit(), LoraConfig(target_modules=["proj"]))
    with pytest.raises(ValueError, match="regex 'blocks.9.*' matches no module"):
        get_deflect_model(tiny_vit(), LoraConfig(target_modules="blocks.9.*"))
    with pytest.raises(ValueError, match="rank=0"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="rank_target='lora'"):
        LoraConfig(rank="auto", rank_target="lora")


# ---- rank: auto ----------------------------------------------------------------------------------
def deflect_count_by_hand(d: int, heads: int, features: int, stats: int = 8, h: int = 8,
                          r: int = 8, blocks: int = 3) -> int:  # fmt: skip
    """Spec section 4: (F·S)·D + D + 2·D·h + h + D + 4·D·r per target block."""
    return features * stats * d + d + 2 * d * h + h + d + 4 * d * r * blocks


@pytest.mark.parametrize(("config", "per_rank", "fixed"), [
    (LoraConfig(rank="auto"), DEPTH * 16 * D, 0),
    (ScaledLoraConfig(rank="auto"), DEPTH * 16 * D, DEPTH * 16 * D),
    (LoraConfig(rank="auto", rank_target=5000), DEPTH * 16 * D, 0),
], ids=["lora", "slr", "number"])  # fmt: skip
def test_rank_auto_picks_the_closest_count(config, per_rank, fixed, caplog) -> None:
    target = 5000 if config.rank_target == 5000 else deflect_count_by_hand(D, 4, features=22)
    expected = min(range(1, 65), key=lambda r: (abs(r * per_rank + fixed - target), r))
    with caplog.at_level(logging.INFO, logger="deflect.tuners.lora.model"):
        model = get_deflect_model(tiny_encoder(), config)
    assert model.peft_config["default"].rank == expected
    assert model.num_adapter_parameters() == expected * per_rank + fixed
    assert f"rank auto: rank {expected} gives {expected * per_rank + fixed:,}" in caplog.text
    assert f"closest to {target:,}" in caplog.text


def test_rank_auto_matches_deflect_as_built() -> None:
    """The target is DEFLECT's count as the tuner builds it, and drawing it changes no RNG."""
    from deflect.tuners.deflect import DeflectTuner

    encoder = tiny_encoder()
    state = torch.get_rng_state()
    counted = DeflectTuner.count_parameters(encoder, s2_spec())
    assert torch.equal(torch.get_rng_state(), state)
    built = get_deflect_model(tiny_encoder(), DeflectConfig()).num_adapter_parameters()
    assert counted == built == deflect_count_by_hand(D, 4, features=22)


def test_rank_auto_on_a_bare_vit_needs_the_bands() -> None:
    with pytest.raises(ValueError, match="rank_target: deflect counts DEFLECT"):
        get_deflect_model(tiny_vit(), LoraConfig(rank="auto"))
    model = get_deflect_model(tiny_vit(), LoraConfig(rank="auto"), data=s2_spec())
    # 16·D·depth = 2,048 per rank against DEFLECT's 9,288: rank 5 (10,240) beats 4 (8,192)
    assert model.peft_config["default"].rank == 5


# ---- band strategies -----------------------------------------------------------------------------
def test_band_table_shows_what_each_band_feeds() -> None:
    from deflect.engine.build import band_table

    class Seg(nn.Module):  # band_table reads model.data and model.encoder
        def __init__(self, encoder):
            super().__init__()
            self.encoder, self.data = encoder, encoder.data

    table = band_table(Seg(get_deflect_model(tiny_encoder(), LoraConfig(band_strategy="repeat"))))
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "pretrained B4 kernel x 3/11" in rows["B1"] and "frozen" in rows["B1"]
    assert "pretrained B2 kernel x 3/11" in rows["B2"]
    assert "pretrained B3 kernel x 3/11" in rows["B5"]
    assert "not used" not in table
    table = band_table(Seg(get_deflect_model(tiny_encoder(), LoraConfig(band_strategy="rgb"))))
    assert "not used by the model: B1, B5, B6, B7, B8, B8A, B11, B12" in table
    table = band_table(
        Seg(get_deflect_model(tiny_encoder(), FrozenConfig(band_strategy="rgb_random")))
    )
    assert "random kernel" in table.splitlines()[1] and "(trained)" in table


def test_band_strategy_options_are_checked() -> None:
    with pytest.raises(ValueError, match="band_strategy='tile'.*rgb_random"):
        BitFitConfig(band_strategy="tile")
    with pytest.raises(ValueError, match="train_patch_embed=true needs a band_strategy"):
        BitFitConfig(train_patch_embed=True)
    with pytest.raises(TypeError, match="band_strategy"):
        DeflectConfig(band_strategy="repeat")  # DEFLECT never changes the patch embedding
    with pytest.raises(ValueError, match="band_strategy=repeat reads the input bands"):
        get_deflect_model(tiny_vit(), BitFitConfig(band_strategy="repeat"))


def test_rgb_random_kernel_saved_with_the_adapter_loads_exactly(tmp_path) -> None:
    """A frozen random kernel is part of the adapter: another seed cannot change a reload."""
    torch.manual_seed(11)
    model = get_deflect_model(tiny_encoder(), FrozenConfig(band_strategy="rgb_random",
                                                           train_patch_embed=False))  # fmt: skip
    x = torch.randn(2, len(S2_BANDS), 32, 32)
    with torch.no_grad():
        out = torch.cat([o.flatten() for o in model(x)])
    model.save_pretrained(tmp_path)
    torch.manual_seed(12)
    loaded = DeflectModel.from_pretrained(tiny_encoder(), tmp_path)
    with torch.no_grad():
        assert torch.equal(torch.cat([o.flatten() for o in loaded(x)]), out)
    assert model.num_adapter_parameters() == 0


def test_spectral_kernel_new_bands_only_trains_the_new_columns_and_keeps_rgb_frozen(tmp_path):
    """``new_bands_only``: D x (C - 3) x p x p trainable parameters (hand count: 32 x 8 x 8 x 8
    for the 11 Sentinel-2 bands on an RGB encoder); after an optimiser step with a loss on every
    output the pretrained kernel's B4, B3, B2 columns are exactly the pretrained kernel's, every
    new column moved; the split kernel saves and reloads exactly."""
    from deflect import SpectralKernelConfig

    encoder = tiny_encoder()
    pretrained = encoder.vit.patch_embed.proj.weight.detach().clone()  # (D, 3, p, p): B4 B3 B2
    model = get_deflect_model(encoder, SpectralKernelConfig(new_bands_only=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == D * (len(S2_BANDS) - 3) * 8 * 8
    kernel = next(m for n, m in model.named_modules() if n.endswith("bands_kernel.default"))
    before = kernel.weight.detach().clone()
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    x = torch.randn(2, len(S2_BANDS), 32, 32)
    sum(o.square().mean() for o in model(x)).backward()
    optimizer.step()
    after = kernel.weight.detach()
    for i, band in enumerate(RGB):
        assert torch.equal(after[:, S2_BANDS.index(band)], pretrained[:, i]), band
    for c, band in enumerate(S2_BANDS):
        if band not in RGB:
            assert not torch.equal(after[:, c], before[:, c]), band
    model.save_pretrained(tmp_path)
    torch.manual_seed(5)
    loaded = DeflectModel.from_pretrained(tiny_encoder(), tmp_path)
    with torch.no_grad():
        assert torch.equal(torch.cat([o.flatten() for o in loaded(x)]),
                           torch.cat([o.flatten() for o in model(x)]))  # fmt: skip
    usage = model.adapter_band_usage()
    assert usage["B4"] == "patch embedding (frozen): pretrained kernel"
    assert usage["B8"] == "patch embedding (trained): random kernel"
    with pytest.raises(ValueError, match="use rgb_random"):
        SpectralKernelConfig(band_strategy="repeat", new_bands_only=True)
    with pytest.raises(ValueError, match="nothing would train"):
        get_deflect_model(tiny_encoder(s2_spec(RGB)), SpectralKernelConfig(new_bands_only=True))


def test_param_counts_lists_the_budget_matched_baselines_beside_deflect():
    """scripts/param_counts.py's count on the tiny ViT (D 32, patch 8, RGB-pretrained) with
    the 11 Sentinel-2 bands: the whole kernel D x 11 x p^2, the new bands' columns D x 8 x p^2
    (hand counts), DEFLECT as the tuner itself counts it."""
    from tests.conftest import load_script

    script = load_script("param_counts")

    def count(method, *overrides):
        return script.count("tiny_vit", S2_BANDS, "sentinel2a", 32, method, list(overrides))[0]

    assert count("spectral_kernel") == D * 11 * 8 * 8
    assert count("spectral_kernel_new") == D * 8 * 8 * 8
    deflect = get_deflect_model(tiny_encoder(), DeflectConfig())
    assert count("deflect") == deflect.get_nb_trainable_parameters()[0]
