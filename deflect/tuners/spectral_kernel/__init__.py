"""The ``spectral_kernel`` baseline: a frozen encoder whose patch embedding learns the extra bands."""

from deflect.tuners.spectral_kernel.config import SpectralKernelConfig
from deflect.tuners.spectral_kernel.model import SpectralKernelTuner

__all__ = ["SpectralKernelConfig", "SpectralKernelTuner"]
