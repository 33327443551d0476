"""Configuration of BitFit."""

from __future__ import annotations

from dataclasses import dataclass

from deflect.tuners.config import TunerConfig


@dataclass
class BitFitConfig(TunerConfig):
    """Every bias of the encoder trains (linear, convolution and LayerNorm biases)."""

    method: str = "bitfit"
