"""Encoders: pretrained ViTs behind one contract (:class:`Encoder`)."""

from deflect.encoders.base import Encoder, fill_invalid
from deflect.encoders.vit import ViTEncoder

__all__ = ["Encoder", "ViTEncoder", "fill_invalid"]
