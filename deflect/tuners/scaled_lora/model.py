"""The SLR tuner: LoRA's, with learned input and output scales on every target layer."""

from __future__ import annotations

from deflect.tuners.lora.model import LoraTuner


class ScaledLoraTuner(LoraTuner):
    """Scaled LoRA (Scheibenreif, Mommert & Borth, CVPR 2024): ``s_in`` and ``s_out`` (ones at
    the start) around each target Linear, plus the low-rank branch; merges into the weights."""

    scaled = True
