"""Embedding deflection of DEFLECT.

DEFLECT — Thoreau, Marsocci & Derksen, *Parameter-Efficient Adaptation of Geospatial Foundation
Models through Embedding Deflection*, ICCV 2025, arXiv:2503.09493.

The attention update keeps the length of the frozen RGB update δ_RGB; the spectral stream only
turns it. Norms are L2 over the feature axis, per token.
"""

from __future__ import annotations

import torch

DEFLECTION_MODES: tuple[str, ...] = ("hard", "embedding", "soft", "none")


def deflect_update(
    delta_uatt: torch.Tensor, delta_rgb: torch.Tensor, mode: str = "hard", eps: float = 1e-6
) -> torch.Tensor:
    """The attention update added to the residual stream.

    ``hard``: δ = ‖δ_RGB‖ · δ_uAtt / max(‖δ_uAtt‖, ε) per token (a pure rotation of δ_RGB's length);
    ``soft`` and ``none``: δ = δ_uAtt (``soft`` adds :func:`deflection_loss` to the training loss);
    ``embedding`` deflects the token rather than the update (:func:`deflect_embedding`, which the
    block calls with the token); here it returns δ_uAtt unchanged.

    Args:
        delta_uatt: the untangled attention update ``(B, T, D)``.
        delta_rgb: the frozen block's own attention update ``(B, T, D)``.
        mode: ``hard``, ``soft`` or ``none``.
        eps: floor of ‖δ_uAtt‖.
    """
    if mode == "hard":
        scale = delta_rgb.norm(dim=-1, keepdim=True) / delta_uatt.norm(
            dim=-1, keepdim=True
        ).clamp_min(eps)  # (B, T, 1)
        return delta_uatt * scale
    if mode in ("soft", "none", "embedding"):  # embedding: see deflect_embedding
        return delta_uatt
    raise ValueError(f"unknown deflection mode {mode!r}; use one of {list(DEFLECTION_MODES)}")


def deflect_embedding(
    x: torch.Tensor, delta_uatt: torch.Tensor, delta_rgb: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Embedding deflection of the token itself: the update that takes ``x`` to

        x' = ‖x + δ_RGB‖ · (x + δ_uAtt) / max(‖x + δ_uAtt‖, ε)          per token

    i.e. the token after the block's attention keeps the length the frozen block gives it, and
    the spectral stream turns it (by any angle) instead of only turning the attention update.
    With δ_uAtt = δ_RGB (U_ℓ = 0 at initialisation) x' = x + δ_RGB: the frozen block.

    Args:
        x: the tokens entering the block ``(B, T, D)``.
        delta_uatt, delta_rgb: the two attention updates ``(B, T, D)`` (after layer scale).
        eps: floor of ‖x + δ_uAtt‖.

    Returns:
        The update ``x' - x`` ``(B, T, D)``.
    """
    target = (x + delta_rgb).norm(dim=-1, keepdim=True)  # (B, T, 1)
    turned = x + delta_uatt
    return turned * (target / turned.norm(dim=-1, keepdim=True).clamp_min(eps)) - x


def deflection_loss(
    delta_uatt: torch.Tensor, delta_rgb: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Soft deflection constraint: mean over tokens of |‖δ_uAtt‖ − ‖δ_RGB‖| / max(‖δ_uAtt‖, ε).

    The authors' prototype's constraint; the caller multiplies by ``lambda_deflection``.
    """
    n_uatt = delta_uatt.float().norm(dim=-1)  # (B, T)
    n_rgb = delta_rgb.float().norm(dim=-1)
    return ((n_uatt - n_rgb).abs() / n_uatt.clamp_min(eps)).mean()
