"""Learning-rate schedule: linear warmup, then cosine, polynomial or constant decay, per step."""

from __future__ import annotations

import math

import torch


def warmup_decay(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_fraction: float = 0.0,
    decay: str = "cosine",
    min_lr_ratio: float = 0.0,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule: ``warmup`` linearly from ~0, then ``decay`` to ``min_lr_ratio`` x lr.

    ``warmup_steps`` wins over ``warmup_fraction`` (of ``total_steps``) when both are set.
    """
    if decay not in ("cosine", "poly", "constant"):
        raise ValueError(f"scheduler.decay={decay!r} is not one of cosine, poly, constant")
    total_steps = max(int(total_steps), 1)
    warmup = int(warmup_steps) if warmup_steps else int(round(warmup_fraction * total_steps))
    warmup = min(warmup, total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if decay == "constant":
            return 1.0
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        if decay == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            shape = (1 - progress) ** power
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
