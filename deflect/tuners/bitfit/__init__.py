"""BitFit (Ben Zaken, Goldberg & Ravfogel, ACL 2022): only the encoder's bias terms train."""

from deflect.tuners.bitfit.config import BitFitConfig
from deflect.tuners.bitfit.model import BitFitTuner

__all__ = ["BitFitConfig", "BitFitTuner"]
