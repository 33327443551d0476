"""Segmentation training for geospatial foundation models, built around DEFLECT.

DEFLECT: Thoreau, Marsocci & Derksen, *Parameter-Efficient Adaptation of Geospatial Foundation
Models through Embedding Deflection*, ICCV 2025, arXiv:2503.09493.
"""

from deflect.data import DataSpec
from deflect.tuners import (
    BitFitConfig,
    DeflectConfig,
    DeflectModel,
    FrozenConfig,
    FullConfig,
    LoraConfig,
    NormTuningConfig,
    ScaledLoraConfig,
    TunerConfig,
    get_deflect_model,
    inject_adapter_in_model,
    register_deflect_method,
    registered_methods,
)

__all__ = [
    "BitFitConfig",
    "DataSpec",
    "DeflectConfig",
    "DeflectModel",
    "FrozenConfig",
    "FullConfig",
    "LoraConfig",
    "NormTuningConfig",
    "ScaledLoraConfig",
    "TunerConfig",
    "get_deflect_model",
    "inject_adapter_in_model",
    "register_deflect_method",
    "registered_methods",
]
