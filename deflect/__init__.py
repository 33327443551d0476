"""Segmentation training for geospatial foundation models, built around DEFLECT.

DEFLECT: Thoreau, Marsocci & Derksen, *Parameter-Efficient Adaptation of Geospatial Foundation
Models through Embedding Deflection*, ICCV 2025, arXiv:2503.09493.

The public names below are imported on first use (PEP 562), so that ``run.py`` can report a bad
config key or print ``--help`` without first importing torch, timm and torchvision (about ten
seconds on a small CPU).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    "SpectralKernelConfig",
    "TunerConfig",
    "get_deflect_model",
    "inject_adapter_in_model",
    "register_deflect_method",
    "registered_methods",
]
# Where each public name lives.
_HOME = {name: "deflect.data" if name == "DataSpec" else "deflect.tuners" for name in __all__}

if TYPE_CHECKING:  # what type checkers and IDEs see
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
        SpectralKernelConfig,
        TunerConfig,
        get_deflect_model,
        inject_adapter_in_model,
        register_deflect_method,
        registered_methods,
    )


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    if name not in _HOME:
        raise AttributeError(f"module 'deflect' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
