"""LoRA (Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, ICLR 2022) on the
encoder's Linear layers, mergeable into the frozen weights."""

from deflect.tuners.lora.config import LoraConfig
from deflect.tuners.lora.layer import LoraLinear
from deflect.tuners.lora.model import LoraTuner

__all__ = ["LoraConfig", "LoraLinear", "LoraTuner"]
