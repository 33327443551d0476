"""The encoder contract and checkpoint loading; the segmentation loss against hand computation."""

from __future__ import annotations

import argparse
import copy
import json
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from deflect import DeflectConfig, get_deflect_model
from deflect.encoders import Encoder, ViTEncoder
from deflect.encoders.checkpoint import resample_pos_embed_3d
from segmentors import SegmentationLoss
from tests.conftest import TINY as TINY_RUN
from tests.conftest import run_cli, s2_spec
from tests.fakes import DEMO_BANDS

BANDS = DEMO_BANDS
TINY = {"embed_dim": 32, "depth": 4, "num_heads": 4}


def tiny(img_size: int = 32, **kwargs) -> ViTEncoder:
    def build() -> ViTEncoder:
        return ViTEncoder("tiny", "vit_tiny_patch16_224", s2_spec(BANDS), ["B4", "B3", "B2"],
                          img_size=img_size, patch_size=8, output_layers=[0, 1, 2, 3],
                          **{"arch_kwargs": TINY, **kwargs})  # fmt: skip

    torch.manual_seed(0)
    if kwargs.get("checkpoint"):
        return build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning, tested on its own
        return build()


def test_pretrained_bands_are_picked_by_name_in_pretraining_order():
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
    assert encoder.band_usage() == {
        "B4": "pretrained patch embedding, channel 0",
        "B3": "pretrained patch embedding, channel 1",
        "B2": "pretrained patch embedding, channel 2",
    }


def test_invalid_pixels_reach_the_pretrained_layers_as_the_band_mean():
    """NaN (no-data, padding) is 0 after normalisation: the band mean, never NaN."""
    encoder = tiny().eval()
    x = torch.randn(1, 4, 32, 32)
    holes = x.clone()
    holes[0, :, 5:9, 10:20] = float("nan")
    filled = holes.nan_to_num(nan=0.0)
    for a, b in zip(encoder(holes), encoder(filled)):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_metadata_the_encoder_does_not_take_is_an_error():
    with pytest.raises(TypeError, match=r"takes metadata \[\], got \['gds'\]"):
        tiny().forward_features(torch.randn(1, 4, 32, 32), gds=torch.ones(1))


def test_no_checkpoint_warns_loudly():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        ViTEncoder("tiny", "vit_tiny_patch16_224", s2_spec(BANDS), img_size=32, patch_size=8,
                   arch_kwargs=TINY)  # fmt: skip


def test_checkpoint_with_prefixes_other_grid_extra_keys_and_a_namespace(tmp_path):
    source = tiny(img_size=64)  # a pretrained model at another resolution (8x8 grid)
    state = {f"module.{k}": v for k, v in source.backbone.state_dict().items()}
    state["module.head.weight"] = torch.zeros(10, 32)  # a classification head: unused, logged
    state["module.decoder_pred.weight"] = torch.zeros(3, 32)  # an MAE decoder: dropped
    del state["module.blocks.3.mlp.fc2.bias"]  # a missing key: left at init, listed
    path = tmp_path / "vit.pth"
    # Release files hold training arguments next to the weights; they load without running code.
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.warns(UserWarning) as record:
        encoder = tiny(img_size=32, checkpoint=str(path))
    message = "\n".join(str(w.message) for w in record)
    assert "decoder_pred.weight" in message and "head.weight" not in message
    assert "blocks.3.mlp.fc2.bias" in message
    loaded = encoder.backbone.state_dict()
    assert torch.equal(
        loaded["blocks.2.attn.qkv.weight"], source.backbone.blocks[2].attn.qkv.weight
    )
    expected_pos = resample_abs_pos_embed(
        source.backbone.pos_embed.detach(), new_size=(4, 4), old_size=(8, 8), num_prefix_tokens=1
    )
    assert torch.allclose(loaded["pos_embed"], expected_pos)


def test_a_shape_that_cannot_be_mapped_is_an_error(tmp_path):
    state = dict(tiny().backbone.state_dict())
    state["patch_embed.proj.weight"] = torch.zeros(32, 6, 8, 8)  # a 6-band patch embedding
    torch.save(state, tmp_path / "six.pth")
    with pytest.raises(ValueError, match=r"patch_embed.proj.weight: checkpoint \(32, 6, 8, 8\)"):
        tiny(checkpoint=str(tmp_path / "six.pth"))


def test_safetensors_checkpoint_and_key_map(tmp_path):
    source = tiny()
    renamed = {
        k.replace("blocks.", "layers."): v.contiguous()
        for k, v in source.backbone.state_dict().items()
    }
    save_file(renamed, str(tmp_path / "vit.safetensors"))
    torch.manual_seed(123)  # other random init: every weight must come from the file
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


def test_a_checkpoint_that_covers_too_little_of_the_encoder_is_refused(tmp_path):
    """A resnet18-like state dict, or the right ViT under an unknown wrapper prefix (``net.``),
    would train on random weights: refused, naming the coverage, the prefixes seen and the fix.
    A partial one (blocks 2 and 3 missing) loads with its coverage in the warning and report."""
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
              "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(10, 512)}  # fmt: skip
    torch.save(resnet, tmp_path / "resnet18.pth")
    total = len(tiny().backbone.state_dict())
    with pytest.raises(ValueError, match=rf"supplies 0 of the encoder's {total} tensors \(0%.*"
                       r"start with \['bn1.', 'conv1.', 'fc.', 'layer1.'\].*another architecture"):  # fmt: skip
        tiny(checkpoint=str(tmp_path / "resnet18.pth"))
    source = tiny()
    torch.save({f"net.{k}": v for k, v in source.backbone.state_dict().items()}, tmp_path / "n.pth")
    with pytest.raises(ValueError, match=r"under the prefix 'net.': strip it with "
                       r"'encoder.checkpoint_key_map=\{net\\\.: \"\"\}' on the command line"):  # fmt: skip
        tiny(checkpoint=str(tmp_path / "n.pth"))
    encoder = tiny(checkpoint=str(tmp_path / "n.pth"), checkpoint_key_map={r"^net\.": ""})
    assert encoder.checkpoint_report["coverage"] == 1.0
    from deflect.engine.report import encoder_checkpoint_record
    from segmentors import Segmentor

    segmentor = Segmentor(get_deflect_model(encoder, DeflectConfig()), num_classes=2, channels=8)
    record = encoder_checkpoint_record(segmentor)["encoder_checkpoint"]  # what metrics.json gets
    assert record == {"path": str(tmp_path / "n.pth"), "loaded": total, "total": total,
                      "coverage": 1.0, "missing": 0}  # fmt: skip
    partial = {k: v for k, v in source.backbone.state_dict().items()
               if not k.startswith(("blocks.2.", "blocks.3."))}  # fmt: skip
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.warns(UserWarning, match=rf"supplies {len(partial)} of the encoder's {total}"):
        encoder = tiny(checkpoint=str(tmp_path / "partial.pth"))
    assert encoder.checkpoint_report["loaded"] == len(partial) < total
    with pytest.raises(ValueError, match="below encoder.checkpoint_min_coverage=0.9"):
        tiny(checkpoint=str(tmp_path / "partial.pth"), checkpoint_min_coverage=0.9)


@pytest.mark.slow
def test_the_coverage_error_s_fix_works_on_the_command_line(demo_root, tmp_path):
    """The fix the message gives, pasted on the command line, loads every tensor, and the
    run's metrics.json records the checkpoint and its coverage."""
    source = tiny()
    path = tmp_path / "wrapped.pth"
    torch.save({f"net.{k}": v for k, v in source.backbone.state_dict().items()}, path)
    args = [*TINY_RUN, f"dataset.root={demo_root}", "epochs=1", "max_steps_per_epoch=1",
            f"encoder.checkpoint={path}", "save_predictions=false", "num_vis=0"]  # fmt: skip
    with pytest.raises(ValueError) as refused:  # what the command line without the fix says
        tiny(checkpoint=str(path))
    fix = re.search(r"strip it with '(encoder.checkpoint_key_map=[^']+)'", str(refused.value))[1]
    run_cli([*args, fix, "work_root=loaded"], tmp_path)
    (run,) = (tmp_path / "loaded").iterdir()
    record = json.loads((run / "metrics.json").read_text())["encoder_checkpoint"]
    assert record["path"] == str(path) and record["coverage"] == 1.0
    assert record["loaded"] == record["total"] == len(source.backbone.state_dict())


def test_encoder_config_errors():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        tiny(img_size=30)
    with pytest.raises(ValueError, match=r"lack \['B4'\].*pretrained patch embedding"):
        ViTEncoder("tiny", "vit_tiny_patch16_224", s2_spec(["B2", "B3", "B8"]), img_size=32,
                   patch_size=8, arch_kwargs=TINY)  # fmt: skip
    with pytest.raises(ValueError, match="output_layers"):
        ViTEncoder("tiny", "vit_tiny_patch16_224", s2_spec(BANDS), img_size=32, patch_size=8,
                   output_layers=[9], arch_kwargs=TINY)  # fmt: skip


# ---- a tubelet (3-D patch embedding) encoder: the contract beyond timm's 2-D ViT ------------------
class TubeletEmbed(nn.Module):
    """A Conv3d patch embedding with tubelet 1, tokens frame-major (Prithvi's layout)."""

    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(channels, dim, (1, patch, patch), stride=(1, patch, patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T*h*w, D)


class TubeletViT(nn.Module):
    def __init__(self, channels: int, dim: int = 32, depth: int = 2, frames: int = 2) -> None:
        super().__init__()
        self.embed_dim, self.num_prefix_tokens = dim, 1
        self.patch_embed = TubeletEmbed(channels, dim, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + frames * 16, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, 4) for _ in range(depth))


class TubeletEncoder(Encoder):
    """A tiny Prithvi-like encoder: (B, C, T, H, W) through a 3-D patch embedding."""

    tubelet_size = 1

    def __init__(self, data, frames: int = 2) -> None:
        super().__init__("tubelet", data, ["B2", "B3", "B4"], 32, 8, [1])
        self.frames = frames
        self.model = TubeletViT(3, frames=frames)
        self.finish_init(2)

    @property
    def vit(self) -> nn.Module:
        return self.model

    def resample_pos_embed(self, key, value, target):
        return resample_pos_embed_3d(value, (self.frames, 4, 4), 1)

    def forward_features(self, x: torch.Tensor, **metadata) -> list[torch.Tensor]:
        self.check_metadata(metadata)
        x = self.embed_input(x).unsqueeze(2).expand(-1, -1, self.frames, -1, -1)  # (B,C,T,H,W)
        vit = self.model
        tokens = vit.patch_embed(x)
        tokens = torch.cat([vit.cls_token.expand(len(x), -1, -1), tokens], 1) + vit.pos_embed
        outs = []
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if i in self.output_layers:
                last = tokens[:, 1 + 16 * (self.frames - 1) :]  # the last frame's patches
                outs.append(last.transpose(1, 2).reshape(len(x), -1, 4, 4))
        return outs


def test_deflect_on_a_tubelet_encoder():
    """The spectral stream follows the 3-D patch embedding's token order; identity at init."""
    torch.manual_seed(0)
    encoder = TubeletEncoder(s2_spec()).eval()
    reference = copy.deepcopy(encoder)
    adapted = get_deflect_model(encoder, DeflectConfig(target_blocks=[0, 1]))
    x = torch.randn(2, 11, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x)[0], reference(x)[0], atol=1e-5, rtol=1e-5)
        upe = encoder.vit.patch_embed.deflect_upe["default"]
        video = x.unsqueeze(2).expand(-1, -1, 2, -1, -1)
        tokens = upe(video)
    assert tokens.shape == (2, 2 * 16, 32)
    torch.testing.assert_close(tokens[:, :16], tokens[:, 16:])  # two identical frames


def test_tubelet_pos_embed_is_resampled_frame_by_frame(tmp_path):
    torch.manual_seed(0)
    big = torch.randn(1, 1 + 2 * 64, 32)  # 2 frames of 8x8 in the checkpoint
    got = resample_pos_embed_3d(big, (2, 4, 4), num_prefix_tokens=1)
    frames = [
        resample_abs_pos_embed(big[:, 1 + 64 * t : 1 + 64 * (t + 1)], new_size=(4, 4),
                               old_size=(8, 8), num_prefix_tokens=0)
        for t in range(2)
    ]  # fmt: skip
    torch.testing.assert_close(got, torch.cat([big[:, :1], *frames], dim=1))
    with pytest.raises(ValueError, match="frames"):
        resample_pos_embed_3d(big, (3, 4, 4), num_prefix_tokens=1)
    encoder = TubeletEncoder(s2_spec())
    state = dict(encoder.vit.state_dict())
    state["pos_embed"] = big
    torch.save(state, tmp_path / "tubelet.pth")
    encoder.load_checkpoint(tmp_path / "tubelet.pth")
    torch.testing.assert_close(encoder.vit.pos_embed.detach(), got)


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


def test_dino_mc_release_checkpoint_loads_the_teacher_backbone(tmp_path):
    """The DINO release layout: teacher and student (DDP-wrapped) with their DINO heads, the
    optimiser, the loss centre and the training arguments; every encoder weight comes from the
    teacher's backbone."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["encoder=dino_mc", "img_size=224"])
    build = instantiate(cfg.encoder, _partial_=True, _convert_="all")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        source = build(data=s2_spec())
    teacher = {f"backbone.{k}": v.clone() for k, v in source.backbone.state_dict().items()}
    teacher["backbone.norm.weight"] = torch.ones(384)  # the final norm DINO keeps
    teacher["backbone.norm.bias"] = torch.zeros(384)
    teacher["head.mlp.0.weight"] = torch.zeros(2048, 384)  # the DINO projection head
    teacher["head.last_layer.weight_g"] = torch.ones(65536, 1)
    student = {f"module.{k}": v + 1 for k, v in teacher.items()}  # must not be used
    path = tmp_path / "dino_mc_vits16.pth"
    torch.save({"student": student, "teacher": teacher, "epoch": 100,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
                "dino_loss": {"center": torch.zeros(1, 65536)},
                "args": argparse.Namespace(arch="vit_small", patch_size=16)}, path)  # fmt: skip
    torch.manual_seed(1)
    encoder = build(data=s2_spec(), checkpoint=str(path))
    loaded = encoder.backbone.state_dict()
    assert loaded.keys() == source.backbone.state_dict().keys()
    for key, value in loaded.items():
        assert torch.equal(value, teacher[f"backbone.{key}"]), key
    # ViT-S/16 at 224 px without its head and final norm: 21.66 M ("21M" in the release table).
    assert sum(p.numel() for p in encoder.parameters()) == 21_664_896


# ---- Scale-MAE -----------------------------------------------------------------------------------
def scale_mae_pos_oracle(dim: int, rows: int, cols: int, res: float) -> np.ndarray:
    """Scale-MAE's embedding by hand (numpy): half the channels for column·res, half for
    row·res, [sin, cos] with ω_k = 10000^(-k/(dim/4)); a zero row first for CLS."""

    def one(d: int, p: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
        angles = np.outer(p, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    cols_of, rows_of = np.meshgrid(np.arange(cols), np.arange(rows))  # [i, j] -> j, i
    emb = np.concatenate(
        [one(dim // 2, cols_of.ravel() * res), one(dim // 2, rows_of.ravel() * res)], axis=1
    )
    return np.concatenate([np.zeros((1, dim)), emb])


def tiny_scale_mae(**kwargs):
    from deflect.encoders import ScaleMAEEncoder

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(RANDOM|gives no GSD)")
        return ScaleMAEEncoder(
            name="scale_mae", arch="vit_tiny_patch16_224", data=kwargs.pop("data", s2_spec(BANDS)),
            img_size=32, patch_size=8, output_layers=[0, 1, 2, 3],
            arch_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 4}, **kwargs,
        ).eval()  # fmt: skip


def test_scale_mae_positional_embedding_follows_each_samples_gsd():
    encoder = tiny_scale_mae()
    reference = tiny(img_size=32)  # a plain ViT with a learned pos_embed slot
    reference.backbone.load_state_dict(encoder.backbone.state_dict(), strict=False)
    x = torch.randn(2, len(BANDS), 32, 32)
    with torch.no_grad():
        out = encoder(x, gsd=torch.tensor([10.0, 30.0]))
        for sample, res in enumerate((10.0, 30.0)):
            pos = torch.from_numpy(scale_mae_pos_oracle(32, 4, 4, res)).float()[None]
            reference.backbone.pos_embed.copy_(pos)
            expected = reference(x)
            for level in range(4):
                torch.testing.assert_close(out[level][sample], expected[level][sample],
                                           atol=1e-5, rtol=1e-5)  # fmt: skip
        # Without a per-sample GSD the dataset's is used.
        spec = s2_spec(BANDS, gsd=30.0)
        fixed = tiny_scale_mae(data=spec)
        torch.testing.assert_close(fixed(x)[3][1], out[3][1], atol=1e-5, rtol=1e-5)


def test_scale_mae_release_checkpoint_loads_with_the_decoder_dropped(tmp_path):
    source = tiny_scale_mae()
    state = {k: v.clone() for k, v in source.backbone.state_dict().items()}
    state["pos_embed"] = torch.randn(1, 1 + 28 * 28, 32)  # the fixed 224-px table: unused
    state["norm.weight"], state["norm.bias"] = torch.ones(32), torch.zeros(32)
    state["mask_token"] = torch.zeros(1, 1, 16)
    state["decoder_embed.weight"] = torch.zeros(16, 32)
    state["decoder_blocks.0.attn.qkv.weight"] = torch.zeros(48, 16)
    state["decoder_pred.weight"] = torch.zeros(192, 16)
    path = tmp_path / "scalemae-vitlarge-800.pth"
    torch.save({"model": state, "epoch": 799, "args": argparse.Namespace(input_size=224)}, path)
    with pytest.warns(UserWarning) as record:
        encoder = tiny_scale_mae(checkpoint=str(path))
    message = "\n".join(str(w.message) for w in record)
    assert "decoder_embed.weight" in message and "mask_token" in message
    loaded = encoder.backbone.state_dict()
    assert loaded.keys() == source.backbone.state_dict().keys()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_deflect_on_scale_mae_is_the_identity_at_init():
    from deflect import DeflectConfig, get_deflect_model

    base = tiny_scale_mae()
    x = torch.randn(2, len(BANDS), 32, 32)
    gsd = torch.tensor([10.0, 20.0])
    with torch.no_grad():
        expected = base(x, gsd=gsd)
        adapted = get_deflect_model(base, DeflectConfig())
        for a, b in zip(adapted(x, gsd=gsd), expected):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("encoder", "d", "depth", "pos_tokens"),
    [("scale_mae", 1024, 24, 0), ("dino_mc", 384, 12, 197), ("cross_scale_mae", 768, 12, 197),
     ("cross_scale_mae_large", 1024, 24, 197), ("vit_b16", 768, 12, 197)],
)  # fmt: skip
def test_parameter_counts_are_the_published_architectures(encoder, d, depth, pos_tokens):
    """A ViT/16 encoder without head and final norm: blocks of 12·D² + 13·D parameters, the
    patch embedding 3·16²·D + D, the CLS token, and the learned positional table of 1 + 14²
    tokens at 224 px (none for Scale-MAE: its table is computed from the GSD)."""
    from tests.conftest import encoder_on_meta

    built = encoder_on_meta(encoder, depth)
    expected = depth * (12 * d * d + 13 * d) + 3 * 16 * 16 * d + d + d + pos_tokens * d
    assert sum(p.numel() for p in built.parameters()) == expected


def cross_scale_release(depth: int, d: int, patch: int, grid: int) -> dict[str, torch.Tensor]:
    """The Cross-Scale MAE release's model dict, names and shapes written out: blocks as
    ``encoder.<i>.*``, ``encoder_pos_embed``, ``encoder_norm``, and its decoder and predictor."""
    g = torch.Generator().manual_seed(3)
    state = {
        "cls_token": torch.randn(1, 1, d, generator=g),
        "encoder_pos_embed": torch.randn(1, 1 + grid * grid, d, generator=g),
        "patch_embed.proj.weight": torch.randn(d, 3, patch, patch, generator=g),
        "patch_embed.proj.bias": torch.randn(d, generator=g),
        "encoder_norm.weight": torch.ones(d), "encoder_norm.bias": torch.zeros(d),
        "mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, d),
        "decoder_pos_embed": torch.zeros(1, 1 + grid * grid, 16),
        "decoder.0.attn.qkv.weight": torch.zeros(48, 16), "decoder_norm.weight": torch.zeros(16),
        "decoder_pred.weight": torch.zeros(3 * patch * patch, 16),
        "predictor.layers.0.weight": torch.zeros(8, 16),
    }  # fmt: skip
    shapes = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
              "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
              "norm2.weight": (d,), "norm2.bias": (d,), "mlp.fc1.weight": (4 * d, d),
              "mlp.fc1.bias": (4 * d,), "mlp.fc2.weight": (d, 4 * d), "mlp.fc2.bias": (d,)}  # fmt: skip
    for i in range(depth):
        for k, s in shapes.items():
            state[f"encoder.{i}.{k}"] = torch.randn(s, generator=g)
    return state


def test_cross_scale_mae_release_checkpoint_loads_through_its_config(tmp_path):
    """encoder=cross_scale_mae reads the release as is: every block, the CLS token and the patch
    embedding loaded, the 8x8 table resampled to 4x4, decoder and predictor listed."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from timm.layers import resample_abs_pos_embed

    from tests.conftest import REPO

    state = cross_scale_release(depth=4, d=32, patch=8, grid=8)
    path = tmp_path / "cross-scale-mae-vitb.pth"
    torch.save({"model": state, "epoch": 399, "args": argparse.Namespace(input_size=64)}, path)
    overrides = ["encoder=cross_scale_mae", "img_size=32", "encoder.patch_size=8",
                 f"encoder.checkpoint={path}", "encoder.output_layers=[0,1,2,3]",
                 "encoder.arch_kwargs={embed_dim: 32, depth: 4, num_heads: 4}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with pytest.warns(UserWarning) as record:
        encoder = instantiate(cfg.encoder, _partial_=True, _convert_="all")(data=s2_spec())
    message = "\n".join(str(w.message) for w in record)
    assert "dropped 7 checkpoint keys" in message and "predictor.layers.0.weight" in message
    assert "missing" not in message
    loaded = encoder.backbone.state_dict()
    for i in range(4):
        assert torch.equal(
            loaded[f"blocks.{i}.attn.qkv.weight"], state[f"encoder.{i}.attn.qkv.weight"]
        )
    assert torch.equal(loaded["cls_token"], state["cls_token"])
    assert torch.equal(loaded["patch_embed.proj.weight"], state["patch_embed.proj.weight"])
    expected = resample_abs_pos_embed(state["encoder_pos_embed"], new_size=[4, 4],
                                      old_size=[8, 8], num_prefix_tokens=1)  # fmt: skip
    torch.testing.assert_close(loaded["pos_embed"], expected)
    assert (
        sum(v.numel() for v in loaded.values())
        == sum(state[k].numel() for k in state if k.startswith(("encoder.", "cls_", "patch_")))
        + expected.numel()
    )  # nothing of the encoder left at random


def test_activation_checkpointing_replays_dropout_and_recomputes_only_with_gradients():
    """Drop-path and dropout draw the same masks when a block is recomputed (DEFLECT's target
    blocks included), and evaluation runs each block once."""
    drop = {**TINY, "drop_path_rate": 0.3, "proj_drop_rate": 0.2}

    def model(recompute: bool, seed: int = 0):
        encoder = tiny(arch_kwargs=drop)
        adapted = get_deflect_model(encoder, DeflectConfig(target_blocks=[1, 2]))
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if name.endswith("U.weight"):
                    p.normal_(0, 0.3)
        adapted.set_activation_checkpointing(recompute)
        calls = []
        for block in encoder.blocks:
            block.norm1.register_forward_hook(lambda *_: calls.append(1))
        adapted.train()
        torch.manual_seed(seed)
        x = torch.randn(2, len(BANDS), 32, 32, generator=torch.Generator().manual_seed(1))
        out = torch.cat([o.flatten() for o in adapted(x)])
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad}
        forward_calls = len(calls)
        with torch.no_grad():
            adapted(x)
        return grads, forward_calls, len(calls) - forward_calls

    plain, plain_calls, _ = model(False)
    again, calls, eval_calls = model(True)
    other_masks, _, _ = model(False, seed=1)
    assert plain.keys() == again.keys()
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], atol=1e-7, rtol=1e-6, msg=name)
    assert any(not torch.allclose(other_masks[n], plain[n]) for n in plain)  # dropout is on
    # 4 blocks forward, then blocks 1-3 again in the backward pass: block 0 has none (its input
    # and weights are frozen, DEFLECT's stream enters at its output)
    assert (plain_calls, calls, eval_calls) == (4, 7, 4)


def test_a_damaged_or_renamed_safetensors_checkpoint_names_the_file(tmp_path):
    """A text file (or a .pth renamed) given as ``.safetensors``: the error names the file and
    what to do, instead of safetensors' bare header message; a real one loads."""
    from safetensors.torch import save_file

    bad = tmp_path / "weights.safetensors"
    bad.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(ValueError, match=rf"cannot read encoder checkpoint '{re.escape(str(bad))}' as safetensors"
                       r".*not a \.safetensors file"):  # fmt: skip
        tiny(checkpoint=str(bad))
    source = tiny()
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, good)
    assert tiny(checkpoint=str(good)).checkpoint_report["coverage"] == 1.0
