"""The ``frozen`` baseline: encoder frozen, decoder only."""

from deflect.tuners.frozen.config import FrozenConfig
from deflect.tuners.frozen.model import FrozenTuner

__all__ = ["FrozenConfig", "FrozenTuner"]
