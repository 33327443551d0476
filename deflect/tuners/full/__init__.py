"""``full`` fine-tuning: everything trains (the oracle)."""

from deflect.tuners.full.config import FullConfig
from deflect.tuners.full.model import FullTuner

__all__ = ["FullConfig", "FullTuner"]
