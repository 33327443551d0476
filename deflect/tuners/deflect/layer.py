"""DEFLECT's adapter layers: the wrapped patch embedding and the wrapped transformer blocks.

DEFLECT — Thoreau, Marsocci & Derksen, *Parameter-Efficient Adaptation of Geospatial Foundation
Models through Embedding Deflection*, ICCV 2025, arXiv:2503.09493.

How the spectral stream travels through timm's own ``forward``/``forward_features``/
``forward_intermediates`` (which we do not fork):

1. :class:`DeflectPatchEmbed` (wraps ``patch_embed``, ``takes_all_bands = True``) gets every band,
   feeds the encoder's pretrained bands (picked by name; invalid pixels as 0) to the frozen patch
   embedding (the geometry stream), and computes the spectral patch tokens before norm matching;
   it opens a new forward in the shared :class:`SpectralStreamState`.
2. timm adds CLS and positional embedding. :class:`DeflectBlock` around ``blocks[0]`` sees x_P as
   it enters the first block and finishes the spectral stream there (spectral CLS, norm matching),
   once per forward.
3. Each target block (a :class:`DeflectBlock` with an :class:`UntangledAttention` for the active
   adapter) reads the finished stream; the last one clears it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deflect.encoders.base import fill_invalid
from deflect.encoders.recompute import is_checkpointed, set_block_checkpointing
from deflect.tuners.deflect.deflection import (
    deflect_embedding,
    deflect_update,
    deflection_loss,
)
from deflect.tuners.deflect.uatt import UntangledAttention, untangled_attention
from deflect.tuners.deflect.upe import UntangledPatchEmbedding
from deflect.tuners.layer import AdapterLayer


class SpectralStreamState:
    """The spectral stream of one forward pass, shared by all DEFLECT layers of a model.

    Lives for one forward: :meth:`start` (in ``patch_embed``) replaces whatever a previous forward
    left, :meth:`enter` (at ``blocks[0]``) finishes the stream, :meth:`consume` (in each target block)
    reads it and drops it after the last target block. Holds no parameters; the soft-deflection
    losses of the last training forward are kept until the next forward starts.
    """

    def __init__(self) -> None:
        self.consumers: dict[str, int] = {}  # adapter name -> number of target blocks
        self.reset()

    def reset(self) -> None:
        """Forget everything of the previous forward."""
        self._pending: torch.Tensor | None = None
        self._finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._tokens: torch.Tensor | None = None
        self._remaining = 0
        self.aux: dict[str, list[torch.Tensor]] = {}

    def start(
        self,
        pending: torch.Tensor,
        finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        consumers: int,
    ) -> None:
        """Begin a forward with spectral patch tokens ``pending`` ``(B, N, D)``."""
        self.reset()
        self._pending, self._finish, self._remaining = pending, finish, consumers

    def enter(self, x_p: torch.Tensor) -> None:
        """Finish the spectral stream from x_P ``(B, P+N, D)``, the input of ``blocks[0]``."""
        if self._pending is not None and self._finish is not None:
            self._tokens = self._finish(self._pending, x_p)
            self._pending = self._finish = None

    def consume(self) -> torch.Tensor:
        """The finished spectral stream x̃_A ``(B, P+N, D)``, for one target block."""
        if self._tokens is None:
            raise RuntimeError(
                "DEFLECT target block ran without a spectral stream: call the model (its "
                "patch_embed and blocks[0]) rather than blocks alone; for activation "
                "checkpointing use Encoder.set_activation_checkpointing (activation_checkpointing="
                "true), not timm's grad_checkpointing"
            )
        tokens = self._tokens
        self._remaining -= 1
        if self._remaining <= 0:
            self._tokens = None
        return tokens

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        """Record one block's auxiliary loss term."""
        self.aux.setdefault(name, []).append(value)

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward, each averaged over the target blocks."""
        return {name: torch.stack(values).mean() for name, values in self.aux.items()}


class DeflectPatchEmbed(AdapterLayer):
    """The pretrained patch embedding plus UPE's spectral stream (one per adapter).

    Takes every band; the frozen ``base_layer`` gets the pretrained bands, picked by name, with
    invalid (NaN) pixels set to 0. Its output is the base layer's, untouched (the geometry stream).

    Args:
        base_layer: the pretrained patch embedding.
        state: the spectral stream shared with the DEFLECT blocks.
        num_prefix: prefix tokens (CLS, registers) of the ViT.
        pretrained_index: input channels of the pretrained bands, in the pretrained order.
    """

    takes_all_bands = True

    def __init__(
        self,
        base_layer: nn.Module,
        state: SpectralStreamState,
        num_prefix: int,
        pretrained_index: list[int],
    ) -> None:
        super().__init__(base_layer)
        self.deflect_upe = nn.ModuleDict()
        self.state = state
        self.num_prefix = num_prefix
        self.pretrained_index = list(pretrained_index)

    def add_adapter(self, adapter_name: str, upe: UntangledPatchEmbedding) -> None:
        """Add the spectral stream of one adapter."""
        self.deflect_upe[adapter_name] = upe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All bands ``(B, C, H, W)`` (or ``(B, C, T, H, W)``) -> the frozen patch embedding of
        the pretrained bands."""
        self.state.reset()
        name = self.active_adapter
        if name not in self.deflect_upe:
            raise RuntimeError(f"DEFLECT adapter {name!r} has no patch embedding here")
        upe = self.deflect_upe[name]
        if x.shape[1] != len(upe.bands):
            raise ValueError(
                f"DEFLECT adapter {name!r} expects {len(upe.bands)} input bands {upe.bands}, got "
                f"{x.shape[1]} channels; feed every band of DeflectConfig.bands, in order"
            )
        out = self.base_layer(fill_invalid(x[:, self.pretrained_index]))  # geometry stream
        if not self.disable_adapters:
            consumers = self.state.consumers.get(name, 0)
            finish = _Finisher(upe, self.num_prefix)
            self.state.start(upe(x), finish, consumers)  # (B, N, D)
        return out


class _Finisher:
    """Bound call ``upe.finish(tokens, x_p, num_prefix)`` (kept for one forward only)."""

    def __init__(self, upe: UntangledPatchEmbedding, num_prefix: int) -> None:
        self.upe, self.num_prefix = upe, num_prefix

    def __call__(self, tokens: torch.Tensor, x_p: torch.Tensor) -> torch.Tensor:
        return self.upe.finish(tokens, x_p, self.num_prefix)


class DeflectBlock(AdapterLayer):
    """A frozen transformer block with uAtt and embedding deflection for some adapters.

    For an adapter with an :class:`UntangledAttention` here:

        u = norm1(x); δ_uAtt, δ_RGB = ls1(m ⊙ uAtt(u, x̃_A))   (m: one proj_drop mask for both)
        x ← x + drop_path(deflect(x, δ_uAtt, δ_RGB));  x ← x + drop_path(ls2(mlp(norm2(x))))

    Otherwise (and when adapters are disabled) the block is its ``base_layer``. The wrapper of
    ``blocks[0]`` (``is_entry``) also finishes the spectral stream from its input x_P.

    Activation checkpointing (:meth:`set_activation_checkpointing`) recomputes only the pure
    part, the update above as a function of (x, x̃_A): reading the shared stream and recording
    the soft-deflection loss happen once per forward, outside the recomputation.
    """

    def __init__(self, base_layer: nn.Module, state: SpectralStreamState, is_entry: bool) -> None:
        super().__init__(base_layer)
        self.deflect_uatt = nn.ModuleDict()
        self.state = state
        self.is_entry = is_entry

    @property
    def checkpoint_activations(self) -> bool:
        """Whether this block recomputes its activations: it follows its base block."""
        return is_checkpointed(self.base_layer)

    def set_activation_checkpointing(self, enable: bool) -> None:
        """Recompute this block's activations in the backward pass (switches the base block)."""
        set_block_checkpointing(self.base_layer, enable)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """``(B, P+N, D) -> (B, P+N, D)``."""
        block = self.base_layer
        if self.disable_adapters or self.active_adapter not in self.deflect_uatt:
            if self.is_entry and not self.disable_adapters:
                self.state.enter(x)
            if attn_mask is None and not is_causal:
                return block(x)
            return block(x, attn_mask=attn_mask, is_causal=is_causal)
        if self.is_entry:
            self.state.enter(x)
        spectral = self.state.consume()  # (B, P+N, D)
        if self.checkpoint_activations and torch.is_grad_enabled():
            x, loss = checkpoint(
                self._adapted, x, spectral, attn_mask, is_causal, use_reentrant=False
            )
        else:
            x, loss = self._adapted(x, spectral, attn_mask, is_causal)
        if loss is not None:
            self.state.add_aux("deflection", loss)
        return x

    def _adapted(
        self,
        x: torch.Tensor,
        spectral: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The adapted block as a pure function of x and x̃_A: its output and the weighted
        soft-deflection loss (None unless ``deflection: soft`` in training)."""
        block = self.base_layer
        uatt: UntangledAttention = self.deflect_uatt[self.active_adapter]
        u = block.norm1(x)  # (B, P+N, D)
        delta_uatt, delta_rgb = untangled_attention(
            block.attn, u, uatt(spectral), uatt.temperature, attn_mask, is_causal
        )  # (B, P+N, D) each
        delta_uatt, delta_rgb = residual_updates(block, delta_uatt, delta_rgb)
        loss = None
        if uatt.deflection == "soft" and self.training:
            loss = uatt.lambda_deflection * deflection_loss(delta_uatt, delta_rgb, uatt.eps)
        drop1 = getattr(block, "drop_path1", getattr(block, "drop_path", nn.Identity()))
        drop2 = getattr(block, "drop_path2", getattr(block, "drop_path", nn.Identity()))
        ls2 = getattr(block, "ls2", nn.Identity())
        if uatt.deflection == "embedding":  # the token keeps the frozen block's length
            x = x + drop1(deflect_embedding(x, delta_uatt, delta_rgb, uatt.eps))
            return x + drop2(ls2(block.mlp(block.norm2(x)))), loss
        x = x + drop1(deflect_update(delta_uatt, delta_rgb, uatt.deflection, uatt.eps))
        return x + drop2(ls2(block.mlp(block.norm2(x)))), loss


def residual_updates(
    block: nn.Module, delta_uatt: torch.Tensor, delta_rgb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both attention updates as the frozen block would add them to the residual stream:
    ``proj_drop`` with ONE dropout mask for both (drawn as the frozen block draws its own), then
    LayerScale ``ls1``. Every deflection constraint then compares what is really added: with
    a trained LayerScale (a per-channel γ) ‖γ ⊙ δ‖ ≠ γ ‖δ‖, and a mask for δ_uAtt alone
    would make the adapted block differ from the frozen one in training at initialisation."""
    proj_drop = getattr(block.attn, "proj_drop", None)
    if proj_drop is not None and proj_drop.training:
        mask = proj_drop(torch.ones_like(delta_rgb))  # 0 or 1 / (1 - p), as for the frozen block
        delta_uatt, delta_rgb = delta_uatt * mask, delta_rgb * mask
    ls1 = getattr(block, "ls1", nn.Identity())
    return ls1(delta_uatt), ls1(delta_rgb)
