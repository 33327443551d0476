"""ViT encoders built on timm, behind the framework's encoder contract.

The contract every encoder keeps (the segmentor and the tuners rely on nothing else):

* ``input_bands``: names of the channels of the tensor given to :meth:`forward_features`, in order;
* ``rgb_bands``: the bands the pretrained patch embedding expects, in its order;
* ``forward_features(x) -> list[Tensor]``: NCHW maps at ``output_layers``;
* ``embed_dim``, ``patch_size``, ``img_size``, ``output_layers``, ``out_channels``;
* ``backbone``: the timm ``VisionTransformer`` (``patch_embed``, ``cls_token``, ``pos_embed``,
  ``blocks``), which is where parameter-efficient tuners inject their layers.

A patch embedding that wants every input band (DEFLECT's untangled patch embedding, or the
``repeat`` band strategy of the competitors) sets ``takes_all_bands = True``; otherwise the
encoder feeds it the ``rgb_bands`` picked by name.
"""

from __future__ import annotations

import logging
import warnings

import timm
import torch
from torch import nn

from deflect.encoders.checkpoint import load_vit_checkpoint

log = logging.getLogger(__name__)


class ViTEncoder(nn.Module):
    """A timm Vision Transformer that returns multi-level NCHW feature maps.

    Args:
        name: short name used in run folders and messages (e.g. ``vit_s16``).
        arch: timm architecture name; built with ``pretrained=False`` (no download, ever).
        input_bands: channel names of the input tensor (the dataset's bands).
        rgb_bands: bands fed to the pretrained patch embedding, in its pretraining order.
        img_size: input size in pixels; must be a multiple of ``patch_size``.
        patch_size: patch size in pixels.
        output_layers: indices of the blocks whose outputs form the feature pyramid.
        checkpoint: local path of pretrained weights, or ``None`` for random weights (warned).
        checkpoint_key_map: regex -> replacement rules applied to checkpoint keys.
        arch_kwargs: overrides passed to timm (``embed_dim``, ``depth``, ``num_heads``, ...).
    """

    def __init__(
        self,
        name: str,
        arch: str,
        input_bands: list[str],
        rgb_bands: list[str],
        img_size: int = 224,
        patch_size: int = 16,
        output_layers: list[int] | None = None,
        checkpoint: str | None = None,
        checkpoint_key_map: dict[str, str] | None = None,
        arch_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.input_bands = list(input_bands)
        self.rgb_bands = list(rgb_bands)
        if img_size % patch_size:
            raise ValueError(
                f"encoder {name}: img_size {img_size} is not a multiple of patch_size "
                f"{patch_size}; set img_size to a multiple of {patch_size}"
            )
        unknown = [b for b in self.rgb_bands if b not in self.input_bands]
        if unknown:
            raise ValueError(
                f"encoder {name}: dataset bands {self.input_bands} lack {unknown} needed for the "
                "RGB stream of the pretrained patch embedding; add them to dataset.bands or set "
                "encoder.rgb_bands"
            )
        if len(set(self.input_bands)) != len(self.input_bands):
            raise ValueError(f"encoder {name}: input bands {self.input_bands} repeat a name")
        self.backbone = timm.create_model(
            arch,
            pretrained=False,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=len(self.rgb_bands),
            num_classes=0,
            global_pool="",
            **dict(arch_kwargs or {}),
        )
        depth = len(self.backbone.blocks)
        self.output_layers = list(output_layers) if output_layers is not None else [depth - 1]
        bad = [i for i in self.output_layers if not 0 <= i < depth]
        if bad:
            raise ValueError(
                f"encoder {name}: output_layers {bad} out of range for a {depth}-block ViT; "
                f"use indices in [0, {depth - 1}]"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.backbone.embed_dim
        self.out_channels = [self.embed_dim] * len(self.output_layers)
        self.register_buffer(
            "rgb_index",
            torch.tensor([self.input_bands.index(b) for b in self.rgb_bands]),
            persistent=False,
        )
        self.checkpoint = checkpoint
        if checkpoint:
            load_vit_checkpoint(self.backbone, checkpoint, checkpoint_key_map, name=name)
        else:
            msg = (
                f"encoder {name}: no checkpoint given (encoder.checkpoint=null), so it runs on "
                "RANDOM weights. A frozen random encoder gives meaningless results; set "
                "encoder.checkpoint=/path/to/weights for real experiments"
            )
            warnings.warn(msg, stacklevel=2)
        # Drop what the feature pyramid never uses (final norm, head, blocks after the last
        # output layer): unused parameters get no gradient, which DDP rejects under `full`.
        self.backbone.prune_intermediate_layers(
            self.output_layers, prune_norm=True, prune_head=True
        )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps ``(B, embed_dim, H/p, W/p)`` at each of ``output_layers``."""
        if x.shape[1] != len(self.input_bands):
            raise ValueError(
                f"encoder {self.name}: got {x.shape[1]} input channels, expected "
                f"{len(self.input_bands)} ({self.input_bands})"
            )
        if not getattr(self.backbone.patch_embed, "takes_all_bands", False):
            x = x.index_select(1, self.rgb_index)
        return self.backbone.forward_intermediates(
            x, indices=self.output_layers, norm=False, output_fmt="NCHW", intermediates_only=True
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Alias of :meth:`forward_features`."""
        return self.forward_features(x)
