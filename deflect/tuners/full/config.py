"""Configuration of ``full`` fine-tuning (the paper's oracle)."""

from __future__ import annotations

from dataclasses import dataclass

from deflect.tuners.config import BandStrategyConfig


@dataclass
class FullConfig(BandStrategyConfig):
    """Every encoder parameter trains, in place.

    Args:
        keep_pretrained: keep a CPU copy of the pretrained weights so ``disable_adapter()`` and
            ``unload()`` can give the base model back (costs one copy of the encoder in host
            memory per process; set false for very large encoders when you do not need them).
    """

    method: str = "full"
    keep_pretrained: bool = True
