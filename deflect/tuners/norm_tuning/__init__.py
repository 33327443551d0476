"""Norm tuning: only the encoder's LayerNorm weights and biases train."""

from deflect.tuners.norm_tuning.config import NormTuningConfig
from deflect.tuners.norm_tuning.model import NormTuningTuner

__all__ = ["NormTuningConfig", "NormTuningTuner"]
