"""Configuration of the ``frozen`` baseline: the encoder is not trained at all."""

from __future__ import annotations

from dataclasses import dataclass

from deflect.tuners.config import BandStrategyConfig


@dataclass
class FrozenConfig(BandStrategyConfig):
    """Encoder frozen; only the decoder (and any ``modules_to_save``) trains."""

    method: str = "frozen"
