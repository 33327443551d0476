"""Configuration of Scaled LoRA (SLR; Scheibenreif, Mommert & Borth, CVPR 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from deflect.tuners.lora.config import LoraConfig


@dataclass
class ScaledLoraConfig(LoraConfig):
    """SLR: ``y = s_out ⊙ (W (s_in ⊙ x) + b + (alpha / rank) · B A (s_in ⊙ x))`` on the target
    Linear layers, with learned scales ``s_in`` (in features) and ``s_out`` (out features)
    starting at one, plus LoRA's low-rank branch. Every option is LoRA's
    (:class:`~deflect.tuners.LoraConfig`)."""

    method: str = "scaled_lora"
