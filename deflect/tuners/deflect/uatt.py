"""uAtt: the Untangled Attention of DEFLECT.

DEFLECT — Thoreau, Marsocci & Derksen, *Parameter-Efficient Adaptation of Geospatial Foundation
Models through Embedding Deflection*, ICCV 2025, arXiv:2503.09493.

In a target block the frozen pretrained projection gives queries, keys and values of the main
(RGB) stream, a trainable low-rank map U_ℓ V_ℓ gives those of the spectral stream, and the two are
summed inside one softmax ("untangled": spatial and spectral parts are projected separately):

    δ_uAtt = proj( softmax(τ (Q_P+Q_A)(K_P+K_A)ᵀ) (V_P+V_A) )
    δ_RGB  = proj( softmax(τ Q_P K_Pᵀ) V_P )               the frozen block's own update

With U_ℓ = 0 (its initialisation) δ_uAtt equals δ_RGB.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class UntangledAttention(nn.Module):
    """The trainable spectral projection of uAtt for one block and one adapter.

    ``[Q_A, K_A, V_A] = U_ℓ (V_ℓ x̃_A)`` with V_ℓ: D→r (Kaiming-uniform, as LoRA's A) and
    U_ℓ: r→3D (zero-initialised, so the adapter starts as the identity). 4·D·r parameters.
    Also carries the block's options: ``temperature``, ``deflection``, ``lambda_deflection``,
    ``eps`` (see :class:`~deflect.tuners.deflect.config.DeflectConfig`).
    """

    def __init__(
        self,
        dim: int,
        attn_dim: int,
        rank: int,
        temperature: str = "sqrt_d",
        deflection: str = "embedding",
        lambda_deflection: float = 1.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.deflection = deflection
        self.lambda_deflection = lambda_deflection
        self.eps = eps
        self.V = nn.Linear(dim, rank, bias=False)
        self.U = nn.Linear(rank, 3 * attn_dim, bias=False)
        nn.init.kaiming_uniform_(self.V.weight, a=math.sqrt(5))
        nn.init.zeros_(self.U.weight)

    def forward(self, spectral: torch.Tensor) -> torch.Tensor:
        """Spectral queries, keys and values ``(B, T, D) -> (B, T, 3·D)``."""
        return self.U(self.V(spectral))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, deflection={self.deflection}"


def _heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, T, 3·h·d)`` -> three ``(B, h, T, d)``, split as timm's ``Attention`` does."""
    b, t, three_dim = qkv.shape
    head_dim = three_dim // (3 * num_heads)
    return qkv.reshape(b, t, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def _attend(
    attn: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    gate: torch.Tensor | None,
) -> torch.Tensor:
    """SDPA then timm's post-attention steps (scale norm, gate, ``proj``), without ``proj_drop``."""
    b, h, t, d = q.shape
    dropout = attn.attn_drop.p if attn.training and hasattr(attn, "attn_drop") else 0.0
    x = F.scaled_dot_product_attention(
        attn.q_norm(q) if hasattr(attn, "q_norm") else q,
        attn.k_norm(k) if hasattr(attn, "k_norm") else k,
        v,
        attn_mask=attn_mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scale,
    )  # (B, h, T, d)
    x = x.transpose(1, 2).reshape(b, t, h * d)  # (B, T, h·d)
    if hasattr(attn, "norm"):
        x = attn.norm(x)
    if gate is not None:
        x = x * gate
    return attn.proj(x)  # (B, T, D)


def untangled_attention(
    attn: nn.Module,
    u: torch.Tensor,
    spectral_qkv: torch.Tensor,
    temperature: str = "sqrt_d",
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two attention updates of a target block.

    Args:
        attn: the frozen timm ``Attention`` of the block (``qkv``, ``proj``, ``num_heads``, and
            ``q_norm``/``k_norm``/``norm``/``gate`` where present, applied as timm does).
        u: ``norm1(x)``, the normalised main stream ``(B, T, D)``.
        spectral_qkv: ``U_ℓ V_ℓ x̃_A`` ``(B, T, 3·D)``.
        temperature: ``sqrt_d`` (τ = 1/√d, the frozen attention's own, identity at init) or
            ``sqrt_2d`` (τ = 1/√(2d), as the authors' prototype) for the untangled softmax.
        attn_mask, is_causal: passed to both attentions, as timm does.

    Returns:
        ``(δ_uAtt, δ_RGB)``, each ``(B, T, D)``.
    """
    num_heads = attn.num_heads
    gate = attn.gate(u).sigmoid() if getattr(attn, "gate", None) is not None else None
    q_p, k_p, v_p = _heads(attn.qkv(u), num_heads)  # (B, h, T, d) each
    q_a, k_a, v_a = _heads(spectral_qkv, num_heads)
    head_dim = q_p.shape[-1]
    rgb_scale = getattr(attn, "scale", head_dim**-0.5)
    if temperature == "sqrt_d":
        scale = rgb_scale
    elif temperature == "sqrt_2d":
        scale = (2 * head_dim) ** -0.5
    else:
        raise ValueError(f"unknown temperature {temperature!r}; use sqrt_d or sqrt_2d")
    delta_rgb = _attend(attn, q_p, k_p, v_p, rgb_scale, attn_mask, is_causal, gate)
    delta_uatt = _attend(attn, q_p + q_a, k_p + k_a, v_p + v_a, scale, attn_mask, is_causal, gate)
    return delta_uatt, delta_rgb
