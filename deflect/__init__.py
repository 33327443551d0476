"""Segmentation training for geospatial foundation models, built around DEFLECT.

DEFLECT: Thoreau, Marsocci & Derksen, *Parameter-Efficient Adaptation of Geospatial Foundation
Models through Embedding Deflection*, ICCV 2025, arXiv:2503.09493.
"""

from deflect.tuners import (
    DeflectConfig,
    DeflectModel,
    FrozenConfig,
    FullConfig,
    TunerConfig,
    get_deflect_model,
    inject_adapter_in_model,
    register_deflect_method,
    registered_methods,
)

__all__ = [
    "DeflectConfig",
    "DeflectModel",
    "FrozenConfig",
    "FullConfig",
    "TunerConfig",
    "get_deflect_model",
    "inject_adapter_in_model",
    "register_deflect_method",
    "registered_methods",
]
