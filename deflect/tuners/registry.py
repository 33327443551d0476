"""The registry of tuning methods: name -> (config class, tuner class).

Adding a method is one new package under ``deflect/tuners/`` and one
:func:`register_deflect_method` call in ``deflect/tuners/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TunerMethod:
    """One registered method: its name, its config class (a ``TunerConfig`` dataclass) and its
    tuner class (a ``BaseTuner``). The registry holds the classes without importing their
    modules, which import it (``config.py`` looks methods up here)."""

    name: str
    config_cls: type
    tuner_cls: type


_METHODS: dict[str, TunerMethod] = {}


def register_deflect_method(name: str, config_cls: type, tuner_cls: type) -> None:
    """Register a tuning method under ``name``.

    Raises:
        ValueError: ``name`` is already registered with other classes, or ``config_cls`` is for
            another method.
    """
    default = config_cls.__dataclass_fields__["method"].default
    if default != name:
        raise ValueError(f"{config_cls.__name__}.method defaults to {default!r}, not {name!r}")
    method = TunerMethod(name, config_cls, tuner_cls)
    if name in _METHODS and _METHODS[name] != method:
        raise ValueError(f"tuning method {name!r} is already registered as {_METHODS[name]}")
    _METHODS[name] = method


def get_method(name: str) -> TunerMethod:
    """The registered method ``name``.

    Raises:
        ValueError: unknown method, listing the registered ones.
    """
    if name not in _METHODS:
        raise ValueError(f"unknown tuning method {name!r}; registered methods: {sorted(_METHODS)}")
    return _METHODS[name]


def registered_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)
