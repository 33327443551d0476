"""The encoder contract and checkpoint loading; the segmentation loss against hand computation."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from deflect.encoders import ViTEncoder
from segmentors import SegmentationLoss

BANDS = ["B2", "B3", "B4", "B8"]
TINY = {"embed_dim": 32, "depth": 4, "num_heads": 4}


def tiny(img_size: int = 32, **kwargs) -> ViTEncoder:
    def build() -> ViTEncoder:
        return ViTEncoder("tiny", "vit_tiny_patch16_224", BANDS, ["B4", "B3", "B2"],
                          img_size=img_size, patch_size=8, output_layers=[0, 1, 2, 3],
                          arch_kwargs=TINY, **kwargs)  # fmt: skip

    if kwargs.get("checkpoint"):
        return build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning, tested on its own
        return build()


def test_rgb_bands_are_picked_by_name_in_pretraining_order():
    encoder = tiny().eval()
    x = torch.randn(2, 4, 32, 32)
    features = encoder.forward_features(x)
    assert [f.shape for f in features] == [(2, 32, 4, 4)] * 4
    rgb = x[:, [2, 1, 0]]  # B4, B3, B2
    direct = encoder.backbone.forward_intermediates(
        rgb, indices=[0, 1, 2, 3], norm=False, output_fmt="NCHW", intermediates_only=True
    )
    for a, b in zip(features, direct):
        assert torch.equal(a, b)


def test_no_checkpoint_warns_loudly():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        ViTEncoder("tiny", "vit_tiny_patch16_224", BANDS, ["B4", "B3", "B2"], img_size=32,
                   patch_size=8, arch_kwargs=TINY)  # fmt: skip


def test_checkpoint_with_prefixes_other_grid_and_extra_keys(tmp_path):
    source = tiny(img_size=64)  # a pretrained model at another resolution (8x8 grid)
    state = {f"module.{k}": v for k, v in source.backbone.state_dict().items()}
    state["module.head.weight"] = torch.zeros(10, 32)  # a classification head: dropped
    del state["module.blocks.3.mlp.fc2.bias"]  # a missing key: left at init, listed
    path = tmp_path / "vit.pth"
    torch.save({"model": state}, path)
    with pytest.warns(UserWarning) as record:
        encoder = tiny(img_size=32, checkpoint=str(path))
    message = "\n".join(str(w.message) for w in record)
    assert "head.weight" in message and "blocks.3.mlp.fc2.bias" in message
    loaded = encoder.backbone.state_dict()
    assert torch.equal(
        loaded["blocks.2.attn.qkv.weight"], source.backbone.blocks[2].attn.qkv.weight
    )
    expected_pos = resample_abs_pos_embed(
        source.backbone.pos_embed.detach(), new_size=(4, 4), old_size=(8, 8), num_prefix_tokens=1
    )
    assert torch.allclose(loaded["pos_embed"], expected_pos)


def test_safetensors_checkpoint_and_key_map(tmp_path):
    source = tiny()
    renamed = {
        k.replace("blocks.", "layers."): v.contiguous()
        for k, v in source.backbone.state_dict().items()
    }
    save_file(renamed, str(tmp_path / "vit.safetensors"))
    encoder = tiny(checkpoint=str(tmp_path / "vit.safetensors"),
                   checkpoint_key_map={r"^layers\.": "blocks."})  # fmt: skip
    x = torch.randn(1, 4, 32, 32)
    for a, b in zip(encoder.eval()(x), source.eval()(x)):
        assert torch.equal(a, b)


def test_checkpoint_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth.*encoder.checkpoint"):
        tiny(checkpoint=str(tmp_path / "nowhere.pth"))
    evil = tmp_path / "evil.pth"
    torch.save({"fn": print}, evil)
    with pytest.raises(ValueError, match="weights_only"):
        tiny(checkpoint=str(evil))


def test_encoder_config_errors():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        tiny(img_size=30)
    with pytest.raises(ValueError, match=r"lack \['B4'\].*rgb_bands"):
        ViTEncoder("tiny", "vit_tiny_patch16_224", ["B2", "B3", "B8"], ["B4", "B3", "B2"],
                   img_size=32, patch_size=8, arch_kwargs=TINY)  # fmt: skip
    with pytest.raises(ValueError, match="output_layers"):
        ViTEncoder("tiny", "vit_tiny_patch16_224", BANDS, ["B4", "B3", "B2"], img_size=32,
                   patch_size=8, output_layers=[9], arch_kwargs=TINY)  # fmt: skip


def test_loss_ignores_pixels_and_weights_classes_like_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0] = -1
    weights = [1.0, 2.0, 0.5]
    loss = SegmentationLoss(3, ignore_index=-1, class_weights=weights)(logits, target)
    logp = F.log_softmax(logits, dim=1).permute(0, 2, 3, 1).reshape(-1, 3)
    t = target.reshape(-1)
    keep = t != -1
    w = torch.tensor(weights)[t[keep]]
    expected = -(w * logp[keep].gather(1, t[keep, None]).squeeze(1)).sum() / w.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    perfect = F.one_hot(target.clamp(min=0), 3).permute(0, 3, 1, 2).float() * 100
    dice = SegmentationLoss(3, ignore_index=-1, dice_weight=1.0).dice(perfect, target)
    assert dice.item() == pytest.approx(0.0, abs=1e-4)  # a perfect prediction has no dice loss
