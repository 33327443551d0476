"""Configuration of BitFit."""

from __future__ import annotations

from dataclasses import dataclass

from deflect.tuners.config import BandStrategyConfig


@dataclass
class BitFitConfig(BandStrategyConfig):
    """Every bias of the encoder trains (linear, convolution and LayerNorm biases)."""

    method: str = "bitfit"
