"""The BitFit tuner: selects the encoder's bias terms."""

from __future__ import annotations

from deflect.tuners.base import BaseTuner
from deflect.tuners.config import TunerConfig


class BitFitTuner(BaseTuner):
    """Trains every parameter named ``bias`` in place; the export holds exactly those tensors."""

    def select_parameters(self, config: TunerConfig) -> list[str]:
        """Every ``*.bias`` parameter of the base model."""
        names = [n for n, _ in self.model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]
        if not names:
            raise ValueError(f"BitFit: {type(self.model).__name__} has no bias parameters")
        return names
