"""The segmentor: encoder -> ViT feature pyramid -> UperNet -> logits at input resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segmentors.neck import ViTFeaturePyramid
from segmentors.upernet import UperNetHead, relu_keeping_mask


class TaskModel(nn.Module):
    """What the engine asks of any task's model (an encoder with a head): the encoder's data
    description and the per-sample metadata it takes. Subclasses set ``self.encoder``."""

    encoder: nn.Module

    @property
    def data(self):
        """The encoder's data description (:class:`~deflect.data.DataSpec`)."""
        return self.encoder.data

    @property
    def metadata_keys(self) -> tuple[str, ...]:
        """Per-sample metadata the encoder takes (e.g. ``gsd``)."""
        return tuple(getattr(self.encoder, "metadata_keys", ()))


class Segmentor(TaskModel):
    """Join an encoder (the framework's contract: ``forward_features`` and ``out_channels``)
    with the feature-pyramid neck and UperNet.

    Args:
        encoder: the (possibly adapted) encoder.
        num_classes: number of classes.
        channels: UperNet width.
        pool_scales: pyramid pooling bins.
        dropout: dropout before the classifier.
        neck_scales: resampling factor of each encoder output level.
        fast_fusion: UperNet's fusion convolution computed at each level's own resolution (the
            same function and parameters; see :func:`segmentors.upernet.conv3x3_of_upsampled`).
        fold_laterals: fold UperNet's 1x1 lateral convolutions into the neck's transposed
            convolutions (the same function and parameters; see :meth:`pyramid_with_laterals`).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        channels: int = 512,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        neck_scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5),
        fast_fusion: bool = True,
        fold_laterals: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.neck = ViTFeaturePyramid(list(encoder.out_channels), tuple(neck_scales))
        self.decode_head = UperNetHead(
            self.neck.out_channels, num_classes, channels, tuple(pool_scales), dropout, fast_fusion
        )
        self.num_classes = num_classes
        self.fold_laterals = fold_laterals

    def forward(self, x: torch.Tensor, **metadata: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` for an input ``(B, C, H, W)``."""
        features = self.encoder.forward_features(x, **metadata)
        if self.fold_laterals:
            logits = self.decode_head(*self.pyramid_with_laterals(features))
        else:
            logits = self.decode_head(self.neck(features))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def pyramid_with_laterals(
        self, features: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The neck's levels, with UperNet's 1x1 lateral convolution folded into the last
        transposed convolution of each upsampled level: ``W' = W_lat · W_T`` and
        ``b' = W_lat · b_T``, recomputed from the same parameters every step. The same function
        (and gradients), without the full-width map at strides p/4 and p/2."""
        head = self.decode_head
        levels, laterals = [], []
        for i, (op, f) in enumerate(zip(self.neck.ops, features)):
            lateral = head.lateral_convs[i] if i < len(head.lateral_convs) else None
            if lateral is None or not (isinstance(op, nn.Sequential) and
                                       isinstance(op[-1], nn.ConvTranspose2d)):  # fmt: skip
                levels.append(op(f))
                laterals.append(None)
                continue
            before = op[:-1](f) if len(op) > 1 else f
            convt, (conv, bn, _) = op[-1], lateral
            w_lat = conv.weight[:, :, 0, 0]  # (channels, C)
            weight = torch.einsum("iokl,po->ipkl", convt.weight, w_lat)
            bias = w_lat @ convt.bias if convt.bias is not None else None
            pre = F.conv_transpose2d(before, weight, bias, stride=convt.stride)
            levels.append(f)  # not used by the head for this level
            laterals.append(relu_keeping_mask(bn(pre)))  # only added to the level above
        return levels, laterals[: len(head.lateral_convs)]

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses the encoder reported for its last forward (e.g. soft deflection)."""
        fn = getattr(self.encoder, "auxiliary_losses", None)
        return fn() if callable(fn) else {}
