"""Plain ViTs built on timm (ViT-S/B/L/16 and any timm ViT by name), behind the
:class:`~deflect.encoders.base.Encoder` contract."""

from __future__ import annotations

import logging

import timm
import torch
from torch import nn

from deflect.data import RGB_BANDS, DataSpec
from deflect.encoders.base import Encoder
from deflect.encoders.checkpoint import DEFAULT_MIN_COVERAGE, resample_pos_embed_2d

log = logging.getLogger(__name__)


def default_patch_size(arch: str, arch_kwargs: dict | None = None) -> int:
    """The patch size timm builds ``arch`` with, read from a model on the meta device (no
    memory, no download).

    Raises:
        ValueError: ``arch`` is not a timm model name, or not a ViT with a patch embedding.
    """
    if arch not in timm.list_models():
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ValueError(f"timm has no model {arch!r}; e.g. {close}. See timm.list_models()")
    with torch.device("meta"):
        probe = timm.create_model(arch, pretrained=False, **dict(arch_kwargs or {}))
    size = getattr(getattr(probe, "patch_embed", None), "patch_size", None)
    if size is None:
        raise ValueError(f"timm model {arch!r} has no patch_embed.patch_size; it is not a ViT")
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class ViTEncoder(Encoder):
    """A timm Vision Transformer that returns multi-level NCHW feature maps.

    Args:
        name: short name used in run folders and messages (e.g. ``vit_s16``).
        arch: timm architecture name; built with ``pretrained=False`` (no download, ever).
        data: what the input holds (its bands pick the pretrained bands by name).
        pretrained_bands: bands of the pretrained patch embedding, in its pretraining order.
        img_size: input size in pixels; must be a multiple of ``patch_size``.
        patch_size: patch size in pixels; None: the architecture's own (e.g. 14 for DINOv2).
        output_layers: indices of the blocks whose outputs form the feature pyramid.
        checkpoint: local path of pretrained weights, or ``None`` for random weights (warned).
        checkpoint_key_map: regex -> replacement rules applied to checkpoint keys.
        checkpoint_min_coverage: the least share of the encoder's tensors the checkpoint must
            supply (below it, loading is an error: it would train on random weights unseen).
        arch_kwargs: overrides passed to timm (``embed_dim``, ``depth``, ``num_heads``, ...).
    """

    def __init__(
        self,
        name: str,
        arch: str,
        data: DataSpec,
        pretrained_bands: list[str] = RGB_BANDS,
        img_size: int = 224,
        patch_size: int | None = 16,
        output_layers: list[int] | str | None = None,
        checkpoint: str | None = None,
        checkpoint_key_map: dict[str, str] | None = None,
        checkpoint_min_coverage: float = DEFAULT_MIN_COVERAGE,
        arch_kwargs: dict | None = None,
    ) -> None:
        if patch_size is None:
            patch_size = default_patch_size(arch, arch_kwargs)
        super().__init__(name, data, list(pretrained_bands), img_size, patch_size, output_layers)
        self.backbone = timm.create_model(
            arch,
            pretrained=False,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=len(self.pretrained_bands),
            num_classes=0,
            global_pool="",
            **dict(arch_kwargs or {}),
        )
        depth = len(self.backbone.blocks)
        self.finish_init(depth)
        # Drop what the feature pyramid never uses (final norm, head, blocks after the last
        # output layer): unused parameters get no gradient, which DDP rejects under `full`.
        self.backbone.prune_intermediate_layers(
            self.output_layers, prune_norm=True, prune_head=True
        )
        self._pruned_blocks = set(range(max(self.output_layers) + 1, depth))
        self.checkpoint = checkpoint
        if checkpoint:
            self.load_checkpoint(checkpoint, checkpoint_key_map, checkpoint_min_coverage)
        else:
            self.warn_random_weights()

    def is_unused_key(self, key: str) -> bool:
        """Checkpoint keys of the parts pruned above (final norm, head, trailing blocks)."""
        if key.startswith(("norm.", "fc_norm.", "head.", "head_drop.")):
            return True
        parts = key.split(".")
        return parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) in self._pruned_blocks

    @property
    def vit(self) -> nn.Module:
        """The timm ``VisionTransformer``."""
        return self.backbone

    @property
    def num_prefix_tokens(self) -> int:
        """CLS and register tokens of the timm model."""
        return int(self.backbone.num_prefix_tokens)

    def resample_pos_embed(
        self, key: str, value: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """A 2-D grid of patches (square in the checkpoint), prefix tokens kept."""
        grid = self.img_size // self.patch_size
        num_prefix = (
            0 if getattr(self.backbone, "no_embed_class", False) else self.num_prefix_tokens
        )
        return resample_pos_embed_2d(value, (grid, grid), num_prefix)

    def forward_tokens(self, x: torch.Tensor, **metadata) -> torch.Tensor:
        """Every token ``(B, P+N, D)`` at the last output layer, prefix tokens first."""
        self.check_metadata(metadata)
        ((patches, prefix),) = self.backbone.forward_intermediates(
            self.embed_input(x),
            indices=[max(self.output_layers)],
            return_prefix_tokens=True,
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
        )
        return torch.cat([prefix, patches], dim=1)

    def forward_features(self, x: torch.Tensor, **metadata) -> list[torch.Tensor]:
        """Feature maps ``(B, embed_dim, H/p, W/p)`` at each of ``output_layers``."""
        self.check_metadata(metadata)
        return self.backbone.forward_intermediates(
            self.embed_input(x),
            indices=self.output_layers,
            norm=False,
            output_fmt="NCHW",
            intermediates_only=True,
        )
