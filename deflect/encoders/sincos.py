"""Fixed sine-cosine embeddings shared by the GFM families (Scale-MAE, Prithvi)."""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``(..., M) -> (..., M, dim)`` in float64: ``[sin(p·ω), cos(p·ω)]`` with
    ``ω_k = 10000^(-k/(dim/2))``, k = 0 … dim/2 - 1 (MAE's 1-D table)."""
    if dim % 2:
        raise ValueError(f"a sine-cosine embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2)
    omega = 1.0 / 10000**omega  # (dim/2,)
    angles = positions.double()[..., None] * omega  # (..., M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)
