"""The DEFLECT tuner: injects UPE and uAtt into a ViT, in place.

DEFLECT — Thoreau, Marsocci & Derksen, *Parameter-Efficient Adaptation of Geospatial Foundation
Models through Embedding Deflection*, ICCV 2025, arXiv:2503.09493.

It relies on the encoder contract (:func:`~deflect.tuners.base.vit_parts`: the module holding
``patch_embed`` and ``blocks``, prefix tokens, patch and tubelet size) and on the timm/DINO block
layout, not on a particular ViT implementation.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace

import spyndex
import torch
from torch import nn

from deflect.tuners.base import BaseTuner, check_block_contract, vit_parts
from deflect.tuners.config import TunerConfig
from deflect.tuners.deflect.config import DeflectConfig
from deflect.tuners.deflect.indices import band_symbols, resolve_indices
from deflect.tuners.deflect.layer import DeflectBlock, DeflectPatchEmbed, SpectralStreamState
from deflect.tuners.deflect.uatt import UntangledAttention
from deflect.tuners.deflect.upe import UntangledPatchEmbedding

log = logging.getLogger(__name__)


def build_upe(data, parts, config: DeflectConfig) -> UntangledPatchEmbedding:
    """UPE for ``data`` on the ViT of ``parts`` (``config`` resolved: explicit indices)."""
    return UntangledPatchEmbedding(
        data=data,
        embed_dim=parts.embed_dim,
        patch_size=parts.patch_size,
        indices=list(config.indices),
        raw_bands=config.raw_bands,
        stats=config.stats,
        hidden_dim=config.hidden_dim,
        pixels_per_patch=config.pixels_per_patch,
        norm_match=config.norm_match,
        cls_token=config.cls_token,
        eps=config.eps,
        nir_from_b8a=config.nir_from_b8a,
        index_clamp=config.index_clamp,
        tubelet_size=parts.tubelet_size,
        standardise_features=config.standardise_features,
    )


def build_uatt(attn: nn.Module, parts, config: DeflectConfig) -> UntangledAttention:
    """uAtt for one target block's attention ``attn``."""
    return UntangledAttention(
        parts.embed_dim,
        attn.qkv.out_features // 3,
        config.rank,
        temperature=config.temperature,
        deflection=config.deflection,
        lambda_deflection=config.lambda_deflection,
        eps=config.eps,
    )


class DeflectTuner(BaseTuner):
    """Adds DEFLECT adapters: wraps ``patch_embed`` (UPE) and ``blocks[0]`` + target blocks (uAtt)."""

    prefix = "deflect_"
    needs_data = True

    def __init__(self, model: nn.Module, data=None, pretrained_bands=None) -> None:
        super().__init__(model, data, pretrained_bands)
        self.state = SpectralStreamState()

    def resolve_config(self, config: TunerConfig) -> TunerConfig:
        """The index list made explicit for these bands (``default``/``auto`` expanded)."""
        if not isinstance(config, DeflectConfig):
            raise TypeError(f"DeflectTuner needs a DeflectConfig, got {type(config).__name__}")
        indices = resolve_indices(
            config.indices, list(self.data.bands), self.data.sensor, config.nir_from_b8a
        )
        return replace(config, indices=indices)

    @classmethod
    def count_parameters(
        cls,
        model: nn.Module,
        data,
        pretrained_bands: list[str] | None = None,
        config: DeflectConfig | None = None,
    ) -> int:
        """What DEFLECT with ``config`` (default: the defaults) would train on ``model`` for
        ``data``, without touching the model or the random state (used by LoRA's ``rank: auto``).
        """
        tuner = cls(model, data, pretrained_bands)  # injects nothing until inject()
        config = tuner.resolve_config(config or DeflectConfig())
        parts = vit_parts(model)
        check_block_contract(parts, sorted({0, *config.target_blocks}))
        with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
            modules = [build_upe(tuner.data, parts, config)]
            for i in config.target_blocks:
                block = parts.blocks[i]
                modules.append(build_uatt(getattr(block, "base_layer", block).attn, parts, config))
        return sum(p.numel() for m in modules for p in m.parameters())

    def _inject(self, config: TunerConfig, adapter_name: str) -> None:
        parts = vit_parts(self.model)
        check_block_contract(parts, sorted({0, *config.target_blocks}))
        blocks = parts.blocks
        first = blocks[0].base_layer if isinstance(blocks[0], DeflectBlock) else blocks[0]
        ref = first.attn.qkv.weight
        factory = {"device": ref.device, "dtype": ref.dtype}

        patch_embed = parts.owner.patch_embed
        if not isinstance(patch_embed, DeflectPatchEmbed):
            index = self.data.index_of(self.pretrained_bands, "DEFLECT's geometry stream")
            patch_embed = DeflectPatchEmbed(patch_embed, self.state, parts.num_prefix_tokens, index)
            parts.owner.patch_embed = patch_embed
        upe = build_upe(self.data, parts, config).to(**factory)
        patch_embed.add_adapter(adapter_name, upe)

        for i in sorted({0, *config.target_blocks}):
            block = blocks[i]
            if not isinstance(block, DeflectBlock):
                block = DeflectBlock(block, self.state, is_entry=i == 0)
                blocks[i] = block
            if i in config.target_blocks:
                attn = block.base_layer.attn
                block.deflect_uatt[adapter_name] = build_uatt(attn, parts, config).to(**factory)
        self.state.consumers[adapter_name] = len(config.target_blocks)
        if getattr(parts.owner, "grad_checkpointing", False):
            warnings.warn(
                "timm's grad_checkpointing recomputes DEFLECT's target blocks without their "
                "spectral stream; disable it and use Encoder.set_activation_checkpointing "
                "(activation_checkpointing=true) instead",
                stacklevel=3,
            )

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name``."""
        super().delete_adapter(adapter_name)
        self.state.consumers.pop(adapter_name, None)

    def unload(self) -> nn.Module:
        """Restore the original ``patch_embed`` and blocks; return the model."""
        self.state.reset()
        return super().unload()

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """The soft-deflection loss of the last training forward (``{}`` otherwise)."""
        return self.state.auxiliary_losses()

    def band_usage(self) -> dict[str, str]:
        """Per band: the spectral stream's raw band and the indices that read it."""
        config = self.configs[self.active_adapter]
        bands = list(self.data.bands)
        channel_of = band_symbols(bands, self.data.sensor, config.nir_from_b8a)
        uses: dict[str, list[str]] = {b: (["raw"] if config.raw_bands else []) for b in bands}
        for index in config.indices:
            for symbol in spyndex.indices[index].bands:
                if symbol in channel_of and index not in uses[bands[channel_of[symbol]]]:
                    uses[bands[channel_of[symbol]]].append(index)
        return {
            band: "DEFLECT spectral stream: " + (", ".join(parts) if parts else "unused")
            for band, parts in uses.items()
        }
