"""The ``full`` tuner: full fine-tuning, every encoder parameter trains (the oracle)."""

from __future__ import annotations

from deflect.tuners.base import BaseTuner
from deflect.tuners.config import TunerConfig


class FullTuner(BaseTuner):
    """Selects every parameter of the model; the saved "adapter" is the whole encoder."""

    def select_parameters(self, config: TunerConfig) -> list[str]:
        """Every parameter."""
        return [name for name, _ in self.model.named_parameters()]
