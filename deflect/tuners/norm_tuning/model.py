"""The norm-tuning tuner: selects the parameters of the encoder's LayerNorms."""

from __future__ import annotations

from deflect.tuners.base import BaseTuner, layer_norm_parameters
from deflect.tuners.config import TunerConfig


class NormTuningTuner(BaseTuner):
    """Trains every LayerNorm's weight and bias in place; the export holds exactly those."""

    def select_parameters(self, config: TunerConfig) -> list[str]:
        """Parameters of every ``nn.LayerNorm`` (timm's subclasses included)."""
        names = layer_norm_parameters(self.model)
        if not names:
            raise ValueError(f"norm tuning: {type(self.model).__name__} has no affine LayerNorm")
        return names
