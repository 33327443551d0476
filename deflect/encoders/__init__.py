"""Encoders: pretrained ViTs behind one contract (:class:`Encoder`)."""

from deflect.encoders.base import Encoder, fill_invalid
from deflect.encoders.prithvi import PRITHVI_BANDS, PrithviEncoder
from deflect.encoders.scale_mae import ScaleMAEEncoder
from deflect.encoders.vit import ViTEncoder

__all__ = [
    "PRITHVI_BANDS",
    "Encoder",
    "PrithviEncoder",
    "ScaleMAEEncoder",
    "ViTEncoder",
    "fill_invalid",
]
