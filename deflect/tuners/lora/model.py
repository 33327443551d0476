"""The LoRA tuner (and, with ``scaled = True``, SLR's): wraps the target Linear layers."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

from torch import nn

from deflect.tuners.base import (
    BaseTuner,
    layer_norm_parameters,
    match_modules,
    summarise_names,
    vit_parts,
)
from deflect.tuners.config import TunerConfig
from deflect.tuners.lora.config import LoraConfig
from deflect.tuners.lora.layer import LoraLinear

log = logging.getLogger(__name__)


class LoraTuner(BaseTuner):
    """Adds LoRA adapters to the Linear layers ``target_modules`` names; mergeable."""

    prefix = "lora_"
    mergeable = True
    #: SLR's learned input and output scales (see :class:`~deflect.tuners.ScaledLoraTuner`).
    scaled = False

    # ---- targets and the rank --------------------------------------------------------------------
    def target_names(self, config: LoraConfig) -> list[str]:
        """Module names of the Linear layers to adapt.

        Raises:
            ValueError: an entry that matches nothing, or matches a module that is not a Linear.
        """
        modules = dict(self.model.named_modules())

        def candidate(name: str) -> bool:  # not inside an adapter layer's own parts
            parts = name.split(".")
            return "base_layer" not in parts and not any(p.startswith(self.prefixes) for p in parts)

        if isinstance(config.target_modules, str):
            pattern = re.compile(config.target_modules)
            owner = vit_parts(self.model).owner
            root = next(n for n, m in modules.items() if m is owner)
            skip = len(root) + 1 if root else 0

            def matches(name: str) -> bool:  # the whole name, or the name inside the ViT
                inside = name[skip:] if name.startswith(root) else name
                return bool(pattern.fullmatch(name) or pattern.fullmatch(inside))

            names = [n for n in modules if n and candidate(n) and matches(n)]
            if not names:
                raise ValueError(
                    f"target_modules regex {config.target_modules!r} matches no module of "
                    f"{type(self.model).__name__}; its modules are: "
                    f"{summarise_names(list(modules))}"
                )
        else:
            names = [
                n for n in match_modules(self.model, config.target_modules, "target_modules")
                if candidate(n)
            ]  # fmt: skip
        wrong = [n for n in names if not isinstance(modules[n], (nn.Linear, LoraLinear))]
        if wrong:
            kinds = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in wrong[:6])
            raise ValueError(
                f"target_modules {config.target_modules!r} matches modules that are not Linear "
                f"layers: {kinds}; LoRA adapts Linear layers: use a more specific name, e.g. "
                "attn.proj rather than proj"
            )
        return names

    def count_for_rank(self, config: LoraConfig, rank: int) -> int:
        """The trainable count of ``config`` at ``rank`` on this model (before injecting)."""
        modules = dict(self.model.named_modules())
        count = 0
        for name in self.target_names(config):
            layer = modules[name]
            layer = layer.base_layer if isinstance(layer, LoraLinear) else layer
            count += rank * (layer.in_features + layer.out_features)
            if self.scaled:
                count += layer.in_features + layer.out_features
        if config.train_norms:
            params = dict(self.model.named_parameters())
            count += sum(params[n].numel() for n in layer_norm_parameters(self.model))
        return count + self.band_kernel_count(config)

    def rank_target(self, config: LoraConfig) -> tuple[int, str]:
        """The count ``rank: auto`` matches and where it comes from."""
        if config.rank_target != "deflect":
            return int(config.rank_target), "rank_target"
        if self.data is None:
            raise ValueError(
                "rank: auto with rank_target: deflect counts DEFLECT's parameters for your bands: "
                "pass data=DataSpec(...) to get_deflect_model, or give rank_target a number"
            )
        from deflect.tuners.deflect import DeflectConfig, DeflectTuner

        count = DeflectTuner.count_parameters(
            self.model, self.data, self.pretrained_bands, DeflectConfig()
        )
        return count, "DEFLECT (default DeflectConfig) on this encoder and bands"

    def resolve_config(self, config: TunerConfig) -> TunerConfig:
        """``rank: auto`` made explicit: the rank whose trainable count is closest to the target
        (the smaller rank on a tie); the choice is logged."""
        if not isinstance(config, LoraConfig):
            raise TypeError(
                f"{type(self).__name__} needs a LoraConfig, got {type(config).__name__}"
            )
        config = super().resolve_config(config)
        if config.rank != "auto":
            return config
        target, source = self.rank_target(config)
        fixed = self.count_for_rank(config, 0)
        per_rank = self.count_for_rank(config, 1) - fixed
        best = max(1, round((target - fixed) / per_rank))
        best = min((max(1, best - 1), best, best + 1),
                   key=lambda r: (abs(self.count_for_rank(config, r) - target), r))  # fmt: skip
        count = self.count_for_rank(config, best)
        log.info(
            "%s rank auto: rank %d gives %s trainable parameters, closest to %s (%s)",
            config.method,
            best,
            f"{count:,}",
            f"{target:,}",
            source,
        )
        if fixed > target:
            log.warning(
                "%s rank auto: even rank 1 trains %s parameters, more than the target %s",
                config.method,
                f"{count:,}",
                f"{target:,}",
            )
        return replace(config, rank=best)

    # ---- injection -------------------------------------------------------------------------------
    def select_parameters(self, config: TunerConfig) -> list[str]:
        """The LayerNorms' parameters with ``train_norms``, else nothing."""
        return layer_norm_parameters(self.model) if config.train_norms else []

    def _inject(self, config: TunerConfig, adapter_name: str) -> None:
        vit_parts(self.model)  # a ViT in the timm/DINO layout, or a clear error
        scaling = config.scaling(int(config.rank))
        for name in self.target_names(config):
            layer = self.model.get_submodule(name)
            if not isinstance(layer, LoraLinear):
                layer = LoraLinear(layer)
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, layer)
            layer.active_adapter = self.active_adapter
            layer.add_adapter(adapter_name, int(config.rank), scaling, config.dropout, self.scaled)

    def lora_layers(self, adapter_name: str) -> list[LoraLinear]:
        """The layers holding adapter ``adapter_name``."""
        return [
            m
            for m in self.model.modules()
            if isinstance(m, LoraLinear) and adapter_name in m.lora_A
        ]

    # ---- merging ---------------------------------------------------------------------------------
    def _merge_modules(self, adapter_name: str) -> None:
        for layer in self.lora_layers(adapter_name):
            layer.merge(adapter_name)

    def _unmerge_modules(self, adapter_name: str) -> None:
        for layer in self.lora_layers(adapter_name):
            layer.unmerge()

    def enable_adapters(self, enabled: bool) -> None:
        """Off: the base model's outputs (a merged adapter is unmerged meanwhile)."""
        if enabled == self.disabled:  # a change of state
            for name in self._merged:
                for layer in self.lora_layers(name):
                    layer.merge(name) if enabled else layer.unmerge()
        super().enable_adapters(enabled)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one that runs and trains (unmerge a merged one first)."""
        if self._merged and adapter_name not in self._merged:
            raise RuntimeError(
                f"adapter {self._merged[0]!r} is merged into the weights: "
                "unmerge_adapter() before switching adapters"
            )
        super().set_adapter(adapter_name)
