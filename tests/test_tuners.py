"""The PEFT-shaped tuner API: registry, configs, the band manifest, save/load, adapters, counts,
errors. (Invariants every method keeps are in test_tuner_matrix.py.)"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from deflect import (
    BitFitConfig,
    DataSpec,
    DeflectConfig,
    DeflectModel,
    FullConfig,
    TunerConfig,
    get_deflect_model,
    inject_adapter_in_model,
    register_deflect_method,
    registered_methods,
)
from deflect.tuners import BaseTuner
from deflect.tuners.deflect.layer import DeflectBlock, DeflectPatchEmbed
from deflect.tuners.deflect.upe import UntangledPatchEmbedding
from tests.conftest import REPO, S2_BANDS, s2_spec, tiny_encoder
from tests.conftest import tiny_timm_vit as tiny_vit
from tests.fakes import DEMO_BANDS

RGB = ["B4", "B3", "B2"]


def rgb(x: torch.Tensor) -> torch.Tensor:
    return x[:, [S2_BANDS.index(b) for b in RGB]]


def train_steps(model: DeflectModel, x: torch.Tensor, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(x)
        out = torch.cat([o.flatten() for o in out]) if isinstance(out, list) else out
        out.square().mean().backward()
        optimizer.step()
    model.eval()


def expected_count(
    d: int, n_features: int, n_stats: int = 8, h: int = 8, r: int = 8, blocks: int = 3
) -> int:
    """Spec section 4: (F·S)·D + D + 2·D·h + h + D + 4·D·r per target block."""
    return n_features * n_stats * d + d + 2 * d * h + h + d + 4 * d * r * blocks


# ---- registry and configs --------------------------------------------------------------------------
def finetune_config_methods() -> set[str]:
    """The methods a user can pick (``finetune=<option>``): the ``method`` of the config class
    each YAML of configs/finetune/ names (``lora_auto.yaml`` names none: it is lora.yaml)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    configs = [OmegaConf.load(p) for p in (REPO / "configs" / "finetune").glob("*.yaml")]
    return {get_class(c._target_).method for c in configs if "_target_" in c}


def test_registry_and_unknown_method() -> None:
    # Every option of the finetune group has a registered method, and nothing else is registered.
    assert set(registered_methods()) == finetune_config_methods()
    assert len(registered_methods()) == 8  # frozen, full, bitfit, norm_tuning, lora,
    # scaled_lora, deflect, spectral_kernel
    with pytest.raises(ValueError, match=r"unknown tuning method 'dora'.*bitfit.*deflect.*lora"):
        TunerConfig.from_dict({"method": "dora"})


def test_register_new_method_is_one_module(tmp_path, monkeypatch) -> None:
    """A method written as base.py says (select base parameters) gets trainability, save/load,
    counts, disable and unload from the one rule."""
    from dataclasses import dataclass

    from deflect.tuners import registry

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # registered for this test

    @dataclass
    class QkvBiasConfig(TunerConfig):
        method: str = "test_qkv_bias"

    class QkvBiasTuner(BaseTuner):
        def select_parameters(self, config: TunerConfig) -> list[str]:
            return [n for n, _ in self.model.named_parameters() if n.endswith("qkv.bias")]

    register_deflect_method("test_qkv_bias", QkvBiasConfig, QkvBiasTuner)
    x = torch.randn(2, 3, 32, 32)
    base = tiny_vit()
    expected = base(x)
    model = get_deflect_model(base, TunerConfig.from_dict({"method": "test_qkv_bias"}))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(n.endswith("qkv.bias") for n in trainable)
    train_steps(model, x)
    tuned = model(x).detach()
    model.save_pretrained(tmp_path)
    assert len(load_file(str(tmp_path / "default" / "deflect_model.safetensors"))) == 4
    with model.disable_adapter():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    reloaded = DeflectModel.from_pretrained(tiny_vit(), tmp_path)
    torch.testing.assert_close(reloaded(x), tuned, rtol=0, atol=0)


def test_config_json_round_trip_and_plain_containers() -> None:
    config = DeflectConfig(indices=["NDVI", "EVI"], deflection="soft", modules_to_save=["norm"])
    data = json.loads(json.dumps(config.to_dict()))
    again = TunerConfig.from_dict(data)
    assert isinstance(again, DeflectConfig) and again == config
    assert DeflectConfig(indices="auto").to_dict()["indices"] == "auto"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"deflection": "bent"}, "unknown deflection mode 'bent'"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"stats": ["mean", "mode"]}, "unknown pixel-set statistic 'mode'"),
        ({"temperature": "hot"}, "temperature"),
        ({"indices": "all"}, "'default' or 'auto'"),
        ({"indices": ["NVDI"]}, r"unknown spyndex index 'NVDI'.*NDVI"),
        ({"method": "lora"}, "DeflectConfig is for method 'deflect'"),
        ({"target_blocks": []}, "target_blocks"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeflectConfig(**kwargs)


# ---- the model contract and the data ---------------------------------------------------------------
def test_model_without_block_layout() -> None:
    spec = s2_spec()
    with pytest.raises(ValueError, match=r"has no `blocks` or `backbone.blocks`"):
        get_deflect_model(nn.Sequential(nn.Linear(2, 2)), DeflectConfig(), data=spec)
    model = tiny_vit()
    model.blocks[0].attn.qkv_fused = model.blocks[0].attn.qkv
    del model.blocks[0].attn.qkv
    with pytest.raises(ValueError, match=r"blocks\[0\].attn \(Attention\) has no `qkv`"):
        get_deflect_model(model, DeflectConfig(), data=spec)
    with pytest.raises(ValueError, match=r"target blocks \[7\] out of range"):
        get_deflect_model(tiny_vit(), DeflectConfig(target_blocks=[0, 7]), data=spec)


def test_deflect_on_a_bare_vit_needs_the_data() -> None:
    with pytest.raises(ValueError, match=r"reads the input bands: pass data=DataSpec"):
        get_deflect_model(tiny_vit(), DeflectConfig())
    with pytest.raises(ValueError, match=r"lack \['B4'\].*pretrained patch embedding"):
        get_deflect_model(tiny_vit(), DeflectConfig(), data=s2_spec(["B2", "B3", "B8"]))


def test_the_encoder_carries_its_data_and_refuses_other_data() -> None:
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match=r"differ from encoder tiny's: bands"):
        get_deflect_model(encoder, DeflectConfig(), data=s2_spec(DEMO_BANDS))
    other_stats = s2_spec(reflectance_scale=10000.0)
    with pytest.raises(ValueError, match=r"reflectance_scale 10000.0 != 1.0"):
        get_deflect_model(tiny_encoder(), DeflectConfig(), data=other_stats)
    adapted = get_deflect_model(tiny_encoder(), DeflectConfig())
    assert adapted.data is adapted.base_model.data and adapted.tuner.pretrained_bands == RGB
    assert adapted.embed_dim == 32 and adapted.input_bands == S2_BANDS  # __getattr__ fallback


def test_wrong_channel_count_is_an_error() -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(), data=s2_spec())
    with pytest.raises(ValueError, match="expects 11 input bands"):
        adapted(torch.rand(1, 3, 32, 32))


def test_default_indices_are_resolved_for_the_bands_and_stored() -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(), data=s2_spec(DEMO_BANDS))
    # The curated list keeps only what B2, B3, B4, B8 allow, in the curated order.
    assert adapted.peft_config["default"].indices == ["NDVI", "NDWI", "EVI", "SAVI", "NDTI"]
    with pytest.raises(ValueError, match=r"NBR.*S2 \(band B12\)"):
        get_deflect_model(tiny_vit(), DeflectConfig(indices=["NDVI", "NBR"]),
                          data=s2_spec(DEMO_BANDS))  # fmt: skip


# ---- parameter counts ------------------------------------------------------------------------------
def test_trainable_count_tiny(capsys) -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(), data=s2_spec())
    trainable, gfm = adapted.get_nb_trainable_parameters()
    assert trainable == expected_count(32, 22) == adapted.num_adapter_parameters()
    assert gfm == sum(p.numel() for p in tiny_vit().parameters())
    head = nn.Conv2d(32, 5, 1)
    text = adapted.print_trainable_parameters({"decoder": head})
    assert f"{trainable:,}" in text and "decoder: trainable params: 165" in text
    assert capsys.readouterr().out.strip() == text


@pytest.mark.parametrize(
    ("arch", "dim"),
    [
        ("vit_small_patch16_224", 384),
        ("vit_base_patch16_224", 768),
        ("vit_large_patch16_224", 1024),
    ],
)
@pytest.mark.parametrize(("bands", "n_features"), [(S2_BANDS, 22), (DEMO_BANDS, 9)])
def test_trainable_count_real_sizes(arch, dim, bands, n_features) -> None:
    with torch.device("meta"):  # no memory, no init cost
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    adapted = get_deflect_model(model, DeflectConfig(), data=s2_spec(bands))
    trainable, gfm = adapted.get_nb_trainable_parameters()
    assert trainable == expected_count(dim, n_features)
    if arch.startswith("vit_large") and bands is S2_BANDS:
        assert trainable == 296_968 and 0.09 < 100 * trainable / gfm < 0.11


# ---- save / load and the band manifest --------------------------------------------------------------
def test_save_load_round_trip_with_band_manifest(
    tmp_path, s2_standard_normal: torch.Tensor
) -> None:
    spec = s2_spec(nodata=-1.0)
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(cls_token="learned"), data=spec)
    train_steps(adapted, s2_standard_normal)
    adapted.save_pretrained(tmp_path)
    folder = tmp_path / "default"
    assert sorted(p.name for p in folder.iterdir()) == [
        "deflect_config.json",
        "deflect_model.safetensors",
    ]
    record = json.loads((folder / "deflect_config.json").read_text())
    assert record["indices"] == list(adapted.peft_config["default"].indices)  # resolved
    manifest = record["band_manifest"]
    assert manifest["pretrained_bands"] == RGB
    assert DataSpec.from_dict(manifest["data"]) == spec
    tensors = load_file(str(folder / "deflect_model.safetensors"))
    assert all(".deflect_" in k and ".default." not in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == adapted.get_nb_trainable_parameters()[0]
    assert sum(k.endswith("deflect_uatt.U.weight") for k in tensors) == 3

    loaded = DeflectModel.from_pretrained(tiny_vit(), tmp_path)  # data from the manifest
    assert loaded.data == spec
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(s2_standard_normal), adapted(s2_standard_normal), rtol=0, atol=0
        )
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = DeflectModel.from_pretrained(tiny_vit(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == adapted.get_nb_trainable_parameters()[0]


def test_from_pretrained_refuses_an_encoder_built_for_other_bands(tmp_path) -> None:
    get_deflect_model(tiny_encoder(), DeflectConfig()).save_pretrained(tmp_path)
    swapped = list(S2_BANDS)
    swapped[1], swapped[2] = swapped[2], swapped[1]  # B3 before B2
    with pytest.raises(
        ValueError, match=r"bands reordered: B2 at 2 instead of 1, B3 at 1 instead of 2"
    ):
        DeflectModel.from_pretrained(tiny_encoder(s2_spec(swapped)), tmp_path)
    with pytest.raises(ValueError, match=r"bands \['B1', 'B5'\] are missing"):
        DeflectModel.from_pretrained(
            tiny_encoder(s2_spec([b for b in S2_BANDS if b not in ("B1", "B5")])), tmp_path
        )
    DeflectModel.from_pretrained(tiny_encoder(), tmp_path)  # the same bands load
    manifest = json.loads((tmp_path / "default" / "deflect_config.json").read_text())[
        "band_manifest"
    ]
    roles = manifest["band_roles"]
    assert list(roles) == S2_BANDS and manifest["pretrained_bands"] == ["B4", "B3", "B2"]
    assert roles["B4"]["pretrained"] == "pretrained patch embedding, channel 0"
    assert roles["B1"]["pretrained"] == "-" and roles["B1"]["adapter"].startswith(
        "DEFLECT spectral stream"
    )


def test_modules_to_save_are_trained_saved_and_restored(tmp_path) -> None:
    x = torch.randn(2, 11, 32, 32)
    base = tiny_vit()
    reference = copy.deepcopy(base)
    adapted = get_deflect_model(base, DeflectConfig(modules_to_save=["norm"]), data=s2_spec())
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert "base_model.norm.weight" in trainable and "base_model.norm.bias" in trainable
    train_steps(adapted, x)
    assert not torch.equal(base.norm.weight, reference.norm.weight)
    adapted.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "default" / "deflect_model.safetensors"))
    assert torch.equal(tensors["norm.weight"], base.norm.weight)
    with adapted.disable_adapter():
        assert torch.equal(base.norm.weight, reference.norm.weight)  # the pretrained value
        torch.testing.assert_close(adapted(x), reference(rgb(x)), rtol=0, atol=0)


def test_a_pattern_that_matches_nothing_is_an_error_listing_modules() -> None:
    with pytest.raises(ValueError, match=r"'nope' matches no module.*blocks\.\*\.norm1"):
        get_deflect_model(tiny_vit(), DeflectConfig(modules_to_save=["nope"]), data=s2_spec())
    # The framework encoder prunes the unused final norm: "norm" names nothing there.
    with pytest.raises(ValueError, match=r"'norm' matches only modules without parameters"):
        get_deflect_model(tiny_encoder(), BitFitConfig(modules_to_save=["norm"]))


# ---- adapter management ----------------------------------------------------------------------------
def test_two_named_adapters_switch(tmp_path, s2_standard_normal: torch.Tensor) -> None:
    base = tiny_vit()
    spec = s2_spec()
    adapted = get_deflect_model(copy.deepcopy(base), DeflectConfig(), "a", data=spec)
    adapted.add_adapter("b", DeflectConfig(rank=4, target_blocks=[1]))
    assert adapted.active_adapter == "a"
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".a." in n for n in trainable)
    train_steps(adapted, s2_standard_normal)
    with torch.no_grad():
        out_a = adapted(s2_standard_normal)
        adapted.set_adapter("b")
        trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
        assert trainable and all(".b." in n for n in trainable)
        torch.testing.assert_close(
            adapted(s2_standard_normal), base(rgb(s2_standard_normal)), atol=1e-5, rtol=1e-5
        )  # b is new
    train_steps(adapted, s2_standard_normal)
    with torch.no_grad():
        out_b = adapted(s2_standard_normal)
        adapted.set_adapter("a")
        torch.testing.assert_close(adapted(s2_standard_normal), out_a, rtol=0, atol=0)
        adapted.set_adapter("b")
        torch.testing.assert_close(adapted(s2_standard_normal), out_b, rtol=0, atol=0)
    adapted.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"a", "b"}
    other = DeflectModel.from_pretrained(copy.deepcopy(base), tmp_path, "a")
    other.load_adapter(tmp_path, "b")
    other.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(other(s2_standard_normal), out_b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already exists"):
        adapted.add_adapter("a", DeflectConfig())
    with pytest.raises(ValueError, match="cannot add a 'full' one"):
        adapted.add_adapter("c", FullConfig())


def test_two_bitfit_adapters_keep_their_own_biases(tmp_path) -> None:
    """Selection methods train base tensors in place; each adapter still keeps its values."""
    x = torch.randn(2, 3, 32, 32)
    base = tiny_vit()
    expected = base(x).detach()
    model = get_deflect_model(base, BitFitConfig(), "a")
    train_steps(model, x)
    out_a = model(x).detach()
    model.add_adapter("b", BitFitConfig())
    model.set_adapter("b")
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # b starts pretrained
    train_steps(model, x, steps=2)
    out_b = model(x).detach()
    assert not torch.allclose(out_a, out_b)
    model.set_adapter("a")
    torch.testing.assert_close(model(x), out_a, rtol=0, atol=0)
    model.save_pretrained(tmp_path)  # "b" is not live: its values come from the side store
    other = DeflectModel.from_pretrained(tiny_vit(), tmp_path, "b")
    torch.testing.assert_close(other(x), out_b, rtol=0, atol=0)


def test_merge_adapter(s2_standard_normal: torch.Tensor) -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(), data=s2_spec())
    train_steps(adapted, s2_standard_normal)
    with torch.no_grad():
        before = adapted(s2_standard_normal)
    with pytest.warns(UserWarning, match="activation-space"):
        assert adapted.merge_adapter() is adapted
    with torch.no_grad():
        torch.testing.assert_close(adapted(s2_standard_normal), before, rtol=0, atol=0)
    # BitFit: the tuned biases are already in place; disabling still gives the pretrained
    # model, and merge_and_unload keeps the tuned biases in a plain model.
    x = rgb(s2_standard_normal)
    base = tiny_vit()
    pretrained = base(x).detach()
    bitfit = get_deflect_model(base, BitFitConfig())
    train_steps(bitfit, x)
    tuned = bitfit(x).detach()
    assert not torch.allclose(pretrained, tuned)
    bitfit.merge_adapter()
    with bitfit.disable_adapter():
        torch.testing.assert_close(bitfit(x), pretrained, rtol=0, atol=0)
    torch.testing.assert_close(bitfit(x), tuned, rtol=0, atol=0)
    plain = bitfit.merge_and_unload()
    assert plain is base and not any(p.requires_grad for p in plain.parameters())
    torch.testing.assert_close(plain(x), tuned, rtol=0, atol=0)


def test_full_without_a_pretrained_copy_warns_on_disable() -> None:
    model = get_deflect_model(tiny_vit(), FullConfig(keep_pretrained=False))
    assert model.tuner._originals == {}
    with pytest.warns(UserWarning, match="keep_pretrained=false"), model.disable_adapter():
        pass


def test_inject_adapter_in_model_in_place(s2_standard_normal: torch.Tensor) -> None:
    model = tiny_vit()
    out = inject_adapter_in_model(DeflectConfig(), model, data=s2_spec())
    assert out is model
    assert isinstance(model.patch_embed, DeflectPatchEmbed) and model.patch_embed.takes_all_bands
    assert isinstance(model.blocks[2], DeflectBlock) and not isinstance(
        model.blocks[3], DeflectBlock
    )
    assert isinstance(model.patch_embed.deflect_upe["default"], UntangledPatchEmbedding)
    assert model.patch_embed.grid_size == (4, 4)  # attributes fall back to base_layer
    assert all("deflect_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert model(s2_standard_normal).shape == (2, 32)


def test_hydra_instantiate_builds_config() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "deflect.tuners.DeflectConfig", "target_blocks": [0, 1]})
    config = instantiate(cfg, _convert_="all")
    assert isinstance(config, DeflectConfig) and config.target_blocks == [0, 1]
    json.dumps(config.to_dict())


def test_hls_bands_take_their_nir_indices_from_b8a_unless_told_not_to() -> None:
    """B8A stands in for N where B8 is absent, by default: HLS data get NDVI and NBR."""
    hls = s2_spec(["B2", "B3", "B4", "B8A", "B11", "B12"])
    with pytest.raises(ValueError, match=r"NDVI.*N \(band B8\)"):
        get_deflect_model(
            tiny_vit(), DeflectConfig(indices=["NDVI", "NBR"], nir_from_b8a=False), data=hls
        )
    default = get_deflect_model(tiny_vit(), DeflectConfig(), data=hls)
    assert "NDVI" in default.peft_config["default"].indices
    config = DeflectConfig(indices=["NDVI", "NBR", "FAI"])
    adapted = get_deflect_model(tiny_vit(), config, data=hls)
    assert adapted(torch.rand(1, 6, 32, 32)).shape == (1, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the happy path
        usage = adapted.adapter_band_usage()
    assert "NDVI" in usage["B8A"] and "NBR" in usage["B8A"] and "NDVI" not in usage["B2"]


def test_spectral_kernel_trains_only_an_all_band_kernel_that_starts_as_the_pretrained_one():
    """D x C x p x p trainable parameters (hand count), the pretrained kernel's slices for the
    RGB bands by name, and a config that would make it the frozen baseline is refused."""
    from deflect import SpectralKernelConfig, get_deflect_model
    from tests.conftest import S2_BANDS, tiny_encoder

    encoder = tiny_encoder()
    pretrained = encoder.vit.patch_embed.proj.weight.detach().clone()  # (D, 3, p, p): B4 B3 B2
    model = get_deflect_model(encoder, SpectralKernelConfig())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    (name,) = trainable
    assert name.endswith("patch_embed.bands_kernel.default.weight")
    kernel = trainable[name]
    assert kernel.numel() == 32 * len(S2_BANDS) * 8 * 8
    for i, band in enumerate(["B4", "B3", "B2"]):
        assert torch.equal(kernel[:, S2_BANDS.index(band)], pretrained[:, i])
    with pytest.raises(ValueError, match="band_strategy rgb_random or repeat"):
        SpectralKernelConfig(band_strategy="rgb")
    with pytest.raises(ValueError, match="train_patch_embed must be true"):
        SpectralKernelConfig(train_patch_embed=False)
