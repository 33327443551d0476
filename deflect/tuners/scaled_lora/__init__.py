"""Scaled LoRA (SLR; Scheibenreif, Mommert & Borth, *Parameter Efficient Self-Supervised
Geospatial Domain Adaptation*, CVPR 2024): LoRA plus learned input and output scales."""

from deflect.tuners.scaled_lora.config import ScaledLoraConfig
from deflect.tuners.scaled_lora.model import ScaledLoraTuner

__all__ = ["ScaledLoraConfig", "ScaledLoraTuner"]
