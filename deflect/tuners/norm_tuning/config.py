"""Configuration of norm tuning."""

from __future__ import annotations

from dataclasses import dataclass

from deflect.tuners.config import BandStrategyConfig


@dataclass
class NormTuningConfig(BandStrategyConfig):
    """The affine weight and bias of every LayerNorm of the encoder train."""

    method: str = "norm_tuning"
