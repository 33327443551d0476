"""The ``full`` tuner: full fine-tuning, every encoder parameter trains (the oracle)."""

from __future__ import annotations

import torch

from deflect.tuners.base import BaseTuner


class FullTuner(BaseTuner):
    """Everything trains; the saved "adapter" is the whole encoder state."""

    modifies_base_weights = True

    def is_trainable_parameter(self, name: str, adapter_name: str) -> bool:
        """Every parameter trains."""
        return True

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The whole encoder state (full fine-tuning changes every weight)."""
        return dict(self.model.state_dict())
