"""The PEFT-shaped tuner API: registry, configs, save/load, adapters, counts, errors."""

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
    DeflectConfig,
    DeflectModel,
    FrozenConfig,
    FullConfig,
    TunerConfig,
    get_deflect_model,
    inject_adapter_in_model,
    register_deflect_method,
    registered_methods,
)
from deflect.tuners import BaseTuner, DeflectTuner
from deflect.tuners.deflect.layer import DeflectBlock, DeflectPatchEmbed
from deflect.tuners.deflect.upe import UntangledPatchEmbedding
from tests.conftest import tiny_timm_vit as tiny_vit

S2_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
DEMO_BANDS = ["B2", "B3", "B4", "B8"]
DEMO_INDICES = ["NDVI", "NDWI", "EVI", "SAVI"]


def rgb(x: torch.Tensor) -> torch.Tensor:
    return x[:, [S2_BANDS.index(b) for b in ("B4", "B3", "B2")]]


@pytest.fixture
def x11() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.rand(2, len(S2_BANDS), 32, 32) * 0.5 + 0.01


def train_steps(model: DeflectModel, x: torch.Tensor, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    model.eval()


def expected_count(
    d: int, n_features: int, n_stats: int = 8, h: int = 8, r: int = 8, blocks: int = 3
) -> int:
    """Spec section 4: (F·S)·D + D + 2·D·h + h + D + 4·D·r per target block."""
    return n_features * n_stats * d + d + 2 * d * h + h + d + 4 * d * r * blocks


# ---- registry and configs --------------------------------------------------------------------------
def test_registry_and_unknown_method() -> None:
    assert {"frozen", "full", "deflect"} <= set(registered_methods())
    with pytest.raises(ValueError, match=r"unknown tuning method 'lora'.*deflect.*frozen.*full"):
        TunerConfig.from_dict({"method": "lora"})


def test_register_new_method_is_one_module() -> None:
    from dataclasses import dataclass

    @dataclass
    class BiasConfig(TunerConfig):
        method: str = "test_bias"

    class BiasTuner(BaseTuner):
        def is_trainable_parameter(self, name: str, adapter_name: str) -> bool:
            return name.endswith(".bias")

    register_deflect_method("test_bias", BiasConfig, BiasTuner)
    model = get_deflect_model(tiny_vit(), TunerConfig.from_dict({"method": "test_bias"}))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".bias") for n in trainable)


def test_config_json_round_trip_and_plain_containers() -> None:
    config = DeflectConfig(
        bands=DEMO_BANDS,
        indices=DEMO_INDICES,
        band_mean={b: 0.1 for b in DEMO_BANDS},
        band_std={b: 0.2 for b in DEMO_BANDS},
        reflectance_scale=10000,
        deflection="soft",
        modules_to_save=["norm"],
    )
    data = json.loads(json.dumps(config.to_dict()))
    again = TunerConfig.from_dict(data)
    assert isinstance(again, DeflectConfig) and again == config
    assert DeflectConfig(bands=S2_BANDS, indices="auto").to_dict()["indices"] == "auto"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"deflection": "bent"}, "unknown deflection mode 'bent'"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"stats": ["mean", "mode"]}, "unknown pixel-set statistic 'mode'"),
        ({"band_mean": {"B2": 0.0}, "band_std": {"B2": 1.0}}, r"band_mean lacks bands \['B3'"),
        ({"band_mean": {"B2": 0.0}}, "both band_mean and band_std"),
        ({"rgb_bands": ["B4", "B3", "B1"]}, r"lack \['B1'\] needed for the RGB stream"),
        ({"temperature": "hot"}, "temperature"),
        ({"indices": "all"}, "'auto'"),
        ({"method": "lora"}, "DeflectConfig is for method 'deflect'"),
        ({"target_blocks": []}, "target_blocks"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    kwargs = {"bands": DEMO_BANDS, "indices": DEMO_INDICES} | kwargs
    with pytest.raises(ValueError, match=message):
        DeflectConfig(**kwargs)


# ---- backbone contract -----------------------------------------------------------------------------
def test_model_without_block_layout() -> None:
    with pytest.raises(ValueError, match=r"has no `blocks` or `backbone.blocks`"):
        get_deflect_model(nn.Sequential(nn.Linear(2, 2)), DeflectConfig(bands=S2_BANDS))
    model = tiny_vit()
    model.blocks[0].attn.qkv_fused = model.blocks[0].attn.qkv
    del model.blocks[0].attn.qkv
    with pytest.raises(ValueError, match=r"blocks\[0\].attn \(Attention\) has no `qkv`"):
        get_deflect_model(model, DeflectConfig(bands=S2_BANDS))
    with pytest.raises(ValueError, match=r"target blocks \[7\] out of range"):
        get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS, target_blocks=[0, 7]))


def test_encoder_band_mismatch_is_an_error() -> None:
    from deflect.encoders import ViTEncoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = ViTEncoder(
            "tiny",
            "vit_tiny_patch16_224",
            S2_BANDS,
            ["B4", "B3", "B2"],
            img_size=32,
            patch_size=8,
            arch_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 4},
        )
    with pytest.raises(ValueError, match="differ from the encoder's input_bands"):
        get_deflect_model(encoder, DeflectConfig(bands=DEMO_BANDS, indices=DEMO_INDICES))
    adapted = get_deflect_model(encoder, DeflectConfig(bands=S2_BANDS))
    assert adapted.embed_dim == 32 and adapted.input_bands == S2_BANDS  # __getattr__ fallback


def test_wrong_channel_count_is_an_error() -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS))
    with pytest.raises(ValueError, match="expects 11 input bands"):
        adapted(torch.rand(1, 3, 32, 32))


# ---- parameter counts ------------------------------------------------------------------------------
def test_trainable_count_tiny(capsys) -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS))
    trainable, gfm = adapted.get_nb_trainable_parameters()
    assert trainable == expected_count(32, 22)
    base = sum(p.numel() for p in tiny_vit().parameters())
    assert gfm == base
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
@pytest.mark.parametrize(
    ("bands", "indices", "n_features"), [(S2_BANDS, None, 22), (DEMO_BANDS, DEMO_INDICES, 8)]
)
def test_trainable_count_real_sizes(arch, dim, bands, indices, n_features) -> None:
    with torch.device("meta"):  # no memory, no init cost
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    kwargs = {} if indices is None else {"indices": indices}
    adapted = get_deflect_model(model, DeflectConfig(bands=bands, **kwargs))
    trainable, gfm = adapted.get_nb_trainable_parameters()
    assert trainable == expected_count(dim, n_features)
    if arch.startswith("vit_large") and bands is S2_BANDS:
        assert trainable == 296_968 and 0.09 < 100 * trainable / gfm < 0.11


# ---- save / load -----------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, x11: torch.Tensor) -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS, cls_token="learned"))
    train_steps(adapted, x11)
    adapted.save_pretrained(tmp_path)
    folder = tmp_path / "default"
    assert sorted(p.name for p in folder.iterdir()) == [
        "deflect_config.json",
        "deflect_model.safetensors",
    ]
    tensors = load_file(str(folder / "deflect_model.safetensors"))
    assert all(".deflect_" in k and ".default." not in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == adapted.get_nb_trainable_parameters()[0]
    assert any(k.endswith("deflect_upe.projection.weight") for k in tensors)
    assert sum(k.endswith("deflect_uatt.U.weight") for k in tensors) == 3

    loaded = DeflectModel.from_pretrained(tiny_vit(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x11), adapted(x11), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = DeflectModel.from_pretrained(tiny_vit(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == adapted.get_nb_trainable_parameters()[0]


def test_modules_to_save_are_trained_and_saved(tmp_path) -> None:
    config = DeflectConfig(bands=S2_BANDS, modules_to_save=["norm"])
    adapted = get_deflect_model(tiny_vit(), config)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert "base_model.norm.weight" in trainable and "base_model.norm.bias" in trainable
    adapted.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "default" / "deflect_model.safetensors"))
    assert {"norm.weight", "norm.bias"} <= set(tensors)
    with pytest.warns(UserWarning, match="matches no module"):
        get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS, modules_to_save=["nope"]))


# ---- adapter management ----------------------------------------------------------------------------
def test_disable_adapter_and_unload(x11: torch.Tensor) -> None:
    model = tiny_vit()
    base = copy.deepcopy(model)
    original_patch_embed = type(model.patch_embed)
    adapted = get_deflect_model(model, DeflectConfig(bands=S2_BANDS))
    train_steps(adapted, x11)
    with torch.no_grad():
        expected = base(rgb(x11))
        assert not torch.allclose(adapted(x11), expected, atol=1e-4)
        with adapted.disable_adapter():
            torch.testing.assert_close(adapted(x11), expected, rtol=0, atol=0)
        assert not torch.allclose(adapted(x11), expected, atol=1e-4)
    restored = adapted.unload()
    assert restored is model and type(restored.patch_embed) is original_patch_embed
    assert all(type(b).__name__ == "Block" for b in restored.blocks)
    assert not any("deflect_" in n for n, _ in restored.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(restored(rgb(x11)), expected, rtol=0, atol=0)


def test_two_named_adapters_switch(tmp_path, x11: torch.Tensor) -> None:
    base = tiny_vit()
    adapted = get_deflect_model(copy.deepcopy(base), DeflectConfig(bands=S2_BANDS), "a")
    adapted.add_adapter("b", DeflectConfig(bands=S2_BANDS, rank=4, target_blocks=[1]))
    assert adapted.active_adapter == "a"
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".a." in n for n in trainable)
    train_steps(adapted, x11)
    with torch.no_grad():
        out_a = adapted(x11)
        adapted.set_adapter("b")
        trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
        assert trainable and all(".b." in n for n in trainable)
        torch.testing.assert_close(adapted(x11), base(rgb(x11)), atol=1e-5, rtol=1e-5)  # b is new
    train_steps(adapted, x11)
    with torch.no_grad():
        out_b = adapted(x11)
        adapted.set_adapter("a")
        torch.testing.assert_close(adapted(x11), out_a, rtol=0, atol=0)
        adapted.set_adapter("b")
        torch.testing.assert_close(adapted(x11), out_b, rtol=0, atol=0)
    adapted.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"a", "b"}
    other = DeflectModel.from_pretrained(copy.deepcopy(base), tmp_path, "a")
    other.load_adapter(tmp_path, "b")
    other.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(other(x11), out_b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already exists"):
        adapted.add_adapter("a", DeflectConfig(bands=S2_BANDS))
    with pytest.raises(ValueError, match="cannot add a 'full' one"):
        adapted.add_adapter("c", FullConfig())


def test_merge_adapter_warns_and_leaves_model(x11: torch.Tensor) -> None:
    adapted = get_deflect_model(tiny_vit(), DeflectConfig(bands=S2_BANDS))
    train_steps(adapted, x11)
    with torch.no_grad():
        before = adapted(x11)
    with pytest.warns(UserWarning, match="activation-space"):
        assert adapted.merge_adapter() is adapted
    with torch.no_grad():
        torch.testing.assert_close(adapted(x11), before, rtol=0, atol=0)


def test_inject_adapter_in_model_in_place(x11: torch.Tensor) -> None:
    model = tiny_vit()
    out = inject_adapter_in_model(DeflectConfig(bands=S2_BANDS), model)
    assert out is model
    assert isinstance(model.patch_embed, DeflectPatchEmbed) and model.patch_embed.takes_all_bands
    assert isinstance(model.blocks[2], DeflectBlock) and not isinstance(
        model.blocks[3], DeflectBlock
    )
    assert isinstance(model.patch_embed.deflect_upe["default"], UntangledPatchEmbedding)
    assert model.patch_embed.grid_size == (4, 4)  # attributes fall back to base_layer
    assert all("deflect_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert model(x11).shape == (2, 32)


# ---- baselines ---------------------------------------------------------------------------------------
def test_frozen_and_full(tmp_path, x11: torch.Tensor) -> None:
    frozen = get_deflect_model(tiny_vit(), FrozenConfig())
    assert frozen.get_nb_trainable_parameters()[0] == 0
    full = get_deflect_model(tiny_vit(), FullConfig())
    trainable, gfm = full.get_nb_trainable_parameters()
    assert trainable == gfm > 0
    with torch.no_grad():
        torch.testing.assert_close(full(rgb(x11)), tiny_vit()(rgb(x11)))
    full.save_pretrained(tmp_path)
    loaded = DeflectModel.from_pretrained(tiny_vit(), tmp_path)
    assert isinstance(loaded.tuner, type(full.tuner)) and not isinstance(loaded.tuner, DeflectTuner)
    assert (
        json.loads((tmp_path / "default" / "deflect_config.json").read_text())["method"] == "full"
    )
    with pytest.warns(UserWarning, match="trains the base weights"), full.disable_adapter():
        pass


def test_hydra_instantiate_builds_config() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "_target_": "deflect.tuners.DeflectConfig",
            "bands": S2_BANDS,
            "band_mean": dict.fromkeys(S2_BANDS, 0.1),
            "band_std": dict.fromkeys(S2_BANDS, 0.2),
            "target_blocks": [0, 1],
        }
    )
    config = instantiate(cfg, _convert_="all")
    assert isinstance(config, DeflectConfig) and config.target_blocks == [0, 1]
    json.dumps(config.to_dict())


def test_hls_bands_need_nir_from_b8a() -> None:
    hls = ["B2", "B3", "B4", "B8A", "B11", "B12"]
    with pytest.raises(ValueError, match=r"NDVI.*N \(band B8\)"):
        DeflectConfig(bands=hls, indices=["NDVI", "NBR"])
    config = DeflectConfig(bands=hls, indices=["NDVI", "NBR", "FAI"], nir_from_b8a=True)
    adapted = get_deflect_model(tiny_vit(), config)
    assert adapted(torch.rand(1, 6, 32, 32)).shape == (1, 32)
