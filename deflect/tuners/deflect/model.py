"""The DEFLECT tuner: injects UPE and uAtt into a timm/DINO ViT, in place.

DEFLECT — Thoreau, Marsocci & Derksen, *Parameter-Efficient Adaptation of Geospatial Foundation
Models through Embedding Deflection*, ICCV 2025, arXiv:2503.09493.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from deflect.tuners.base import BaseTuner, check_vit_contract, find_vit
from deflect.tuners.config import TunerConfig
from deflect.tuners.deflect.config import DeflectConfig
from deflect.tuners.deflect.indices import canonical_band
from deflect.tuners.deflect.layer import DeflectBlock, DeflectPatchEmbed, SpectralStreamState
from deflect.tuners.deflect.uatt import UntangledAttention
from deflect.tuners.deflect.upe import UntangledPatchEmbedding

log = logging.getLogger(__name__)


def _patch_size(patch_embed: nn.Module) -> int:
    size = getattr(patch_embed, "patch_size", None)
    if size is None:
        raise ValueError("model.patch_embed has no `patch_size`")
    if isinstance(size, int):
        return size
    size = tuple(size)
    if len(set(size)) != 1:
        raise ValueError(f"DEFLECT needs square patches, got patch_size {size}")
    return int(size[0])


def _num_prefix_tokens(vit: nn.Module) -> int:
    if hasattr(vit, "num_prefix_tokens"):
        return int(vit.num_prefix_tokens)
    return int(getattr(vit, "cls_token", None) is not None)


class DeflectTuner(BaseTuner):
    """Adds DEFLECT adapters: wraps ``patch_embed`` (UPE) and ``blocks[0]`` + target blocks (uAtt)."""

    prefix = "deflect_"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.state = SpectralStreamState()

    def _inject(self, config: TunerConfig, adapter_name: str) -> None:
        if not isinstance(config, DeflectConfig):
            raise TypeError(f"DeflectTuner needs a DeflectConfig, got {type(config).__name__}")
        vit = find_vit(self.model)
        check_vit_contract(vit, sorted({0, *config.target_blocks}))
        self._check_encoder_bands(config)
        ref = vit.blocks[0].attn.qkv.weight
        dim = vit.blocks[0].attn.qkv.in_features
        factory = {"device": ref.device, "dtype": ref.dtype}

        patch_embed = vit.patch_embed
        if not isinstance(patch_embed, DeflectPatchEmbed):
            patch_embed = DeflectPatchEmbed(patch_embed, self.state, _num_prefix_tokens(vit))
            vit.patch_embed = patch_embed
        upe = UntangledPatchEmbedding(
            bands=config.bands,
            embed_dim=dim,
            patch_size=_patch_size(patch_embed.base_layer),
            indices=config.resolved_indices(),
            raw_bands=config.raw_bands,
            stats=config.stats,
            hidden_dim=config.hidden_dim,
            band_mean=config.band_mean,
            band_std=config.band_std,
            reflectance_scale=config.reflectance_scale,
            pixels_per_patch=config.pixels_per_patch,
            norm_match=config.norm_match,
            cls_token=config.cls_token,
            eps=config.eps,
            sensor=config.sensor,
            nir_from_b8a=config.nir_from_b8a,
            index_clamp=config.index_clamp,
        ).to(**factory)
        patch_embed.add_adapter(adapter_name, upe, config.rgb_bands)

        for i in sorted({0, *config.target_blocks}):
            block = vit.blocks[i]
            if not isinstance(block, DeflectBlock):
                block = DeflectBlock(block, self.state, is_entry=i == 0)
                vit.blocks[i] = block
            if i in config.target_blocks:
                attn = block.base_layer.attn
                block.deflect_uatt[adapter_name] = UntangledAttention(
                    dim,
                    attn.qkv.out_features // 3,
                    config.rank,
                    temperature=config.temperature,
                    deflection=config.deflection,
                    lambda_deflection=config.lambda_deflection,
                    eps=config.eps,
                ).to(**factory)
        self.state.consumers[adapter_name] = len(config.target_blocks)
        if getattr(vit, "grad_checkpointing", False):
            warnings.warn(
                "DEFLECT target blocks do not support activation checkpointing; disable "
                "grad_checkpointing on the encoder",
                stacklevel=3,
            )

    def _check_encoder_bands(self, config: DeflectConfig) -> None:
        """On the framework's encoders, the config's bands must be the encoder's."""
        for attr, ours in (("input_bands", config.bands), ("rgb_bands", config.rgb_bands)):
            theirs = getattr(self.model, attr, None)
            if theirs is not None and [canonical_band(b) for b in theirs] != [
                canonical_band(b) for b in ours
            ]:
                raise ValueError(
                    f"DeflectConfig.{'bands' if attr == 'input_bands' else attr} {ours} differ "
                    f"from the encoder's {attr} {list(theirs)}; build both from the dataset's bands"
                )

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name``."""
        super().delete_adapter(adapter_name)
        self.state.consumers.pop(adapter_name, None)

    def unload(self) -> nn.Module:
        """Restore the original ``patch_embed`` and blocks; return the model."""
        self.state.reset()
        return super().unload()

    def merge(self) -> nn.Module:
        """DEFLECT acts on activations: nothing to merge; the model is left unchanged."""
        msg = (
            "DEFLECT is an activation-space method (UPE and uAtt act on token streams): it has no "
            "weight delta to merge; the model is left unchanged"
        )
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
        return self.model

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """The soft-deflection loss of the last training forward (``{}`` otherwise)."""
        return self.state.auxiliary_losses()
