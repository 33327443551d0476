"""Parameter-efficient tuners, PEFT-shaped: one package per method, one registry.

Methods register here, explicitly: ``frozen``, ``full`` and ``deflect`` (DEFLECT, Thoreau,
Marsocci & Derksen, ICCV 2025, arXiv:2503.09493). Adding a method is one new package and one
:func:`register_deflect_method` line below.
"""

from deflect.tuners.base import AdapterLayer, BaseTuner
from deflect.tuners.config import TunerConfig
from deflect.tuners.deflect import DeflectConfig, DeflectTuner
from deflect.tuners.frozen import FrozenConfig, FrozenTuner
from deflect.tuners.full import FullConfig, FullTuner
from deflect.tuners.model import DeflectModel, get_deflect_model, inject_adapter_in_model
from deflect.tuners.registry import get_method, register_deflect_method, registered_methods

register_deflect_method("frozen", FrozenConfig, FrozenTuner)
register_deflect_method("full", FullConfig, FullTuner)
register_deflect_method("deflect", DeflectConfig, DeflectTuner)

__all__ = [
    "AdapterLayer",
    "BaseTuner",
    "DeflectConfig",
    "DeflectModel",
    "DeflectTuner",
    "FrozenConfig",
    "FrozenTuner",
    "FullConfig",
    "FullTuner",
    "TunerConfig",
    "get_deflect_model",
    "get_method",
    "inject_adapter_in_model",
    "register_deflect_method",
    "registered_methods",
]
