"""The norm-tuning tuner: selects the parameters of the encoder's LayerNorms."""

from __future__ import annotations

from torch import nn

from deflect.tuners.base import BaseTuner
from deflect.tuners.config import TunerConfig


class NormTuningTuner(BaseTuner):
    """Trains every LayerNorm's weight and bias in place; the export holds exactly those."""

    def select_parameters(self, config: TunerConfig) -> list[str]:
        """Parameters of every ``nn.LayerNorm`` (timm's subclasses included)."""
        names = [
            f"{module_name}.{param_name}" if module_name else param_name
            for module_name, module in self.model.named_modules()
            if isinstance(module, nn.LayerNorm)
            for param_name, _ in module.named_parameters(recurse=False)
        ]
        if not names:
            raise ValueError(f"norm tuning: {type(self.model).__name__} has no affine LayerNorm")
        return names
