"""Parameter-efficient tuners, PEFT-shaped: one package per method, one registry.

Methods register here, explicitly: ``frozen``, ``full``, ``bitfit``, ``norm_tuning`` and
``deflect`` (DEFLECT, Thoreau, Marsocci & Derksen, ICCV 2025, arXiv:2503.09493). Adding a method
is one new package and one :func:`register_deflect_method` line below.
"""

from deflect.tuners.base import AdapterLayer, BaseTuner, ViTParts, vit_parts
from deflect.tuners.bitfit import BitFitConfig, BitFitTuner
from deflect.tuners.config import TunerConfig
from deflect.tuners.deflect import DeflectConfig, DeflectTuner
from deflect.tuners.frozen import FrozenConfig, FrozenTuner
from deflect.tuners.full import FullConfig, FullTuner
from deflect.tuners.model import DeflectModel, get_deflect_model, inject_adapter_in_model
from deflect.tuners.norm_tuning import NormTuningConfig, NormTuningTuner
from deflect.tuners.registry import get_method, register_deflect_method, registered_methods

register_deflect_method("frozen", FrozenConfig, FrozenTuner)
register_deflect_method("full", FullConfig, FullTuner)
register_deflect_method("bitfit", BitFitConfig, BitFitTuner)
register_deflect_method("norm_tuning", NormTuningConfig, NormTuningTuner)
register_deflect_method("deflect", DeflectConfig, DeflectTuner)

__all__ = [
    "AdapterLayer",
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
    "NormTuningConfig",
    "NormTuningTuner",
    "TunerConfig",
    "ViTParts",
    "get_deflect_model",
    "get_method",
    "inject_adapter_in_model",
    "register_deflect_method",
    "registered_methods",
    "vit_parts",
]
