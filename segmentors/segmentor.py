"""The segmentor: encoder -> ViT feature pyramid -> UperNet -> logits at input resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segmentors.neck import ViTFeaturePyramid
from segmentors.upernet import UperNetHead


class Segmentor(nn.Module):
    """Join an encoder (the framework's contract: ``forward_features`` and ``out_channels``)
    with the feature-pyramid neck and UperNet.

    Args:
        encoder: the (possibly adapted) encoder.
        num_classes: number of classes.
        channels: UperNet width.
        pool_scales: pyramid pooling bins.
        dropout: dropout before the classifier.
        neck_scales: resampling factor of each encoder output level.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        channels: int = 512,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        neck_scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5),
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.neck = ViTFeaturePyramid(list(encoder.out_channels), tuple(neck_scales))
        self.decode_head = UperNetHead(
            self.neck.out_channels, num_classes, channels, tuple(pool_scales), dropout
        )
        self.num_classes = num_classes

    @property
    def data(self):
        """The encoder's data description (:class:`~deflect.data.DataSpec`)."""
        return self.encoder.data

    @property
    def metadata_keys(self) -> tuple[str, ...]:
        """Per-sample metadata the encoder takes (e.g. ``gsd``)."""
        return tuple(getattr(self.encoder, "metadata_keys", ()))

    def forward(self, x: torch.Tensor, **metadata: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` for an input ``(B, C, H, W)``."""
        features = self.encoder.forward_features(x, **metadata)
        logits = self.decode_head(self.neck(features))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses the encoder reported for its last forward (e.g. soft deflection)."""
        fn = getattr(self.encoder, "auxiliary_losses", None)
        return fn() if callable(fn) else {}
