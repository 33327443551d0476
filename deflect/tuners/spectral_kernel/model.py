"""The ``spectral_kernel`` tuner: the frozen encoder with a trainable all-band patch kernel.

The band strategy (:mod:`deflect.tuners.bands`, shared by every competitor) builds the kernel and
makes it trainable; everything else of the encoder stays frozen, as under ``frozen``.
"""

from __future__ import annotations

from deflect.tuners.frozen.model import FrozenTuner


class SpectralKernelTuner(FrozenTuner):
    """Every encoder parameter frozen; the all-band patch-embedding kernel trains."""
