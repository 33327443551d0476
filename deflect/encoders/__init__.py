"""Encoders: pretrained ViTs behind one contract (see :class:`ViTEncoder`)."""

from deflect.encoders.vit import ViTEncoder

__all__ = ["ViTEncoder"]
