"""Image-level classification head: a linear layer on the encoder's pooled final tokens."""

from __future__ import annotations

import torch
from torch import nn

from segmentors.segmentor import TaskModel

#: How the final tokens are pooled into one vector per image.
POOLINGS = ("cls", "mean", "cls_mean")


class ImageClassifier(TaskModel):
    """Encoder -> pooled final tokens -> LayerNorm -> dropout -> Linear: one logit per class.

    The encoder gives every token of its last output layer (``forward_tokens``: prefix tokens
    such as CLS first); ``pooling`` takes the CLS token (``cls``, the default, as a ViT's linear
    evaluation does), the mean of the patch tokens (``mean``), or both concatenated
    (``cls_mean``). Every fine-tuning method works unchanged: the tokens are the adapted
    encoder's (DEFLECT's deflection reaches the CLS token through the attention of its blocks).

    Args:
        encoder: the (possibly adapted) encoder.
        num_classes: number of classes (labels, for multi-label tasks).
        pooling: ``cls``, ``mean`` or ``cls_mean``.
        dropout: dropout before the linear layer.
    """

    def __init__(
        self, encoder: nn.Module, num_classes: int, pooling: str = "cls", dropout: float = 0.0
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: use one of {list(POOLINGS)}")
        self.encoder = encoder
        self.pooling = pooling
        self.num_prefix = int(getattr(encoder, "num_prefix_tokens", 1))
        dim = int(encoder.embed_dim) * (2 if pooling == "cls_mean" else 1)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)
        self.num_classes = num_classes

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, P+N, D)`` -> ``(B, D)`` (``(B, 2D)`` for ``cls_mean``)."""
        cls = tokens[:, 0]  # (B, D)
        mean = tokens[:, self.num_prefix :].mean(dim=1)  # (B, D)
        if self.pooling == "cls":
            return cls
        if self.pooling == "mean":
            return mean
        return torch.cat([cls, mean], dim=-1)

    def forward(self, x: torch.Tensor, **metadata: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for an input ``(B, C, H, W)``."""
        tokens = self.encoder.forward_tokens(x, **metadata)  # (B, P+N, D)
        return self.head(self.dropout(self.norm(self.pool(tokens))))

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses the encoder reported for its last forward (e.g. soft deflection)."""
        fn = getattr(self.encoder, "auxiliary_losses", None)
        return fn() if callable(fn) else {}
