"""Configuration of ``full`` fine-tuning (the paper's oracle)."""

from __future__ import annotations

from dataclasses import dataclass

from deflect.tuners.config import TunerConfig


@dataclass
class FullConfig(TunerConfig):
    """Every encoder parameter trains."""

    method: str = "full"
