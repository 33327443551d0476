"""Parameter-efficient tuners, PEFT-shaped: one package per method, one registry.

Methods register here, explicitly: ``frozen``, ``full``, ``bitfit``, ``norm_tuning``, ``lora``,
``scaled_lora``, ``spectral_kernel`` and ``deflect`` (DEFLECT, Thoreau, Marsocci & Derksen, ICCV 2025,
arXiv:2503.09493). Every method but DEFLECT takes a ``band_strategy``
(:class:`~deflect.tuners.config.BandStrategyConfig`). Adding a method
is one new package and one :func:`register_deflect_method` line below.
"""

from deflect.tuners.base import AdapterLayer, BaseTuner, ViTParts, vit_parts
from deflect.tuners.bitfit import BitFitConfig, BitFitTuner
from deflect.tuners.config import BandStrategyConfig, TunerConfig
from deflect.tuners.deflect import DeflectConfig, DeflectTuner
from deflect.tuners.frozen import FrozenConfig, FrozenTuner
from deflect.tuners.full import FullConfig, FullTuner
from deflect.tuners.lora import LoraConfig, LoraTuner
from deflect.tuners.model import DeflectModel, get_deflect_model, inject_adapter_in_model
from deflect.tuners.norm_tuning import NormTuningConfig, NormTuningTuner
from deflect.tuners.registry import get_method, register_deflect_method, registered_methods
from deflect.tuners.scaled_lora import ScaledLoraConfig, ScaledLoraTuner
from deflect.tuners.spectral_kernel import SpectralKernelConfig, SpectralKernelTuner

register_deflect_method("frozen", FrozenConfig, FrozenTuner)
register_deflect_method("full", FullConfig, FullTuner)
register_deflect_method("bitfit", BitFitConfig, BitFitTuner)
register_deflect_method("norm_tuning", NormTuningConfig, NormTuningTuner)
register_deflect_method("lora", LoraConfig, LoraTuner)
register_deflect_method("scaled_lora", ScaledLoraConfig, ScaledLoraTuner)
register_deflect_method("deflect", DeflectConfig, DeflectTuner)
register_deflect_method("spectral_kernel", SpectralKernelConfig, SpectralKernelTuner)

__all__ = [
    "AdapterLayer",
    "BandStrategyConfig",
    "BaseTuner",
    "BitFitConfig",
    "BitFitTuner",
    "DeflectConfig",
    "DeflectModel",
    "DeflectTuner",
    "FrozenConfig",
    "FrozenTuner",
    "FullConfig",
    "FullTuner",
    "LoraConfig",
    "LoraTuner",
    "NormTuningConfig",
    "NormTuningTuner",
    "ScaledLoraConfig",
    "ScaledLoraTuner",
    "SpectralKernelConfig",
    "SpectralKernelTuner",
    "TunerConfig",
    "ViTParts",
    "get_deflect_model",
    "get_method",
    "inject_adapter_in_model",
    "register_deflect_method",
    "registered_methods",
    "vit_parts",
]
