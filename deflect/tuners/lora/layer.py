"""The LoRA / SLR adapter layer around a frozen ``nn.Linear``.

For the active adapter (``scaling = alpha / rank``)::

    LoRA:  y = W x + b + scaling · B A dropout(x)
    SLR:   y = s_out ⊙ (W x' + b + scaling · B A dropout(x')),   x' = s_in ⊙ x

Merging folds the adapter into the base weights, computed in fp32 and cast back::

    LoRA:  W ← W + scaling · B A
    SLR:   W ← diag(s_out) (W + scaling · B A) diag(s_in),   b ← s_out ⊙ b

and keeps a host copy of what it overwrote, so unmerging restores the weights bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deflect.tuners.layer import AdapterLayer


class Scale(nn.Module):
    """A learned per-feature scale, starting at one."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))


class LoraLinear(AdapterLayer):
    """A frozen Linear with LoRA (and, for SLR, scale) adapters keyed by name."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_scale_in = nn.ModuleDict()
        self.lora_scale_out = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.merged: str | None = None
        self._saved: dict[str, torch.Tensor] = {}  # what merging overwrote (host copies)

    def add_adapter(
        self, adapter_name: str, rank: int, scaling: float, dropout: float, scaled: bool
    ) -> None:
        """Add adapter ``adapter_name``: A Kaiming-uniform (a = √5), B zero; SLR scales at one."""
        base = self.base_layer
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        a = nn.Linear(base.in_features, rank, bias=False, **factory)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        b = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.zeros_(b.weight)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = a, b
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[adapter_name] = float(scaling)
        if scaled:
            self.lora_scale_in[adapter_name] = Scale(base.in_features).to(**factory)
            self.lora_scale_out[adapter_name] = Scale(base.out_features).to(**factory)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove one adapter."""
        super().delete_adapter(adapter_name)
        self.scaling.pop(adapter_name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., out)``."""
        name = self.active_adapter
        if self.disable_adapters or self.merged is not None or name not in self.lora_A:
            return self.base_layer(x)
        scaled = name in self.lora_scale_in
        if scaled:
            x = x * self.lora_scale_in[name].weight
        a, b = self.lora_A[name], self.lora_B[name]
        out = self.base_layer(x)
        delta = b(a(self.lora_dropout[name](x).to(a.weight.dtype))).to(out.dtype)
        out = out + delta * self.scaling[name]
        if scaled:
            out = out * self.lora_scale_out[name].weight
        return out

    # ---- merging ---------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling · B A`` in fp32, ``(out, in)``."""
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        return (b @ a) * self.scaling[adapter_name]

    @torch.no_grad()
    def merge(self, adapter_name: str) -> None:
        """Fold adapter ``adapter_name`` into the base weight (and bias, for SLR)."""
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is already merged into this layer")
        base = self.base_layer
        self._saved = {"weight": base.weight.detach().to("cpu", copy=True)}
        weight = base.weight.float() + self.delta_weight(adapter_name)
        if adapter_name in self.lora_scale_in:
            s_in = self.lora_scale_in[adapter_name].weight.float()
            s_out = self.lora_scale_out[adapter_name].weight.float()
            weight = weight * s_in[None, :] * s_out[:, None]
            if base.bias is not None:
                self._saved["bias"] = base.bias.detach().to("cpu", copy=True)
                base.bias.copy_((base.bias.float() * s_out).to(base.bias.dtype))
        base.weight.copy_(weight.to(base.weight.dtype))
        self.merged = adapter_name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back exactly the weights :meth:`merge` overwrote."""
        if self.merged is None:
            return
        for name, value in self._saved.items():
            getattr(self.base_layer, name).copy_(value)
        self._saved = {}
        self.merged = None
