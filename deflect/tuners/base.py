"""What every tuner shares: the adapter-layer base class, the ViT parts tuners adapt, and the one
source of truth for an adapter's parameters.

Tuners follow Hugging Face PEFT. Two kinds of method fit one base class:

* methods that **add modules** (DEFLECT, LoRA): an adapter wraps the layer it adapts (kept as
  ``base_layer``, see :class:`AdapterLayer`), its modules live under one attribute prefix (e.g.
  ``deflect_``) keyed by adapter name, and it starts as the identity;
* methods that **select base parameters** (BitFit, norm tuning, full fine-tuning, and any
  method's ``modules_to_save``): the selected tensors train in place; their pretrained values are
  kept aside, so :meth:`BaseTuner.enable_adapters` (``disable_adapter()``) and
  :meth:`BaseTuner.unload` give the base model back, and each adapter keeps its own values.

:meth:`BaseTuner.adapter_tensor_names` is the single list every consumer reads: trainability,
``save_pretrained``/``from_pretrained``, parameter counts, disabling, unloading and merging.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from deflect.data import RGB_BANDS, DataSpec
from deflect.encoders import Encoder
from deflect.tuners.bands import (
    BandKernel,
    BandPatchEmbed,
    band_kernel,
    find_patch_conv,
    kernel_sources,
)
from deflect.tuners.config import BandStrategyConfig, TunerConfig
from deflect.tuners.layer import BAND_PREFIX, AdapterLayer

log = logging.getLogger(__name__)


# ---- the ViT parts tuners adapt ------------------------------------------------------------------
@dataclass
class ViTParts:
    """Where tuners inject: the module holding ``patch_embed`` and ``blocks``, and its geometry.

    Found by :func:`vit_parts` from the framework's :class:`~deflect.encoders.Encoder` contract, or
    from a bare ViT in the timm/DINO layout (``model.blocks`` or ``model.backbone.blocks``).
    """

    owner: nn.Module
    num_prefix_tokens: int
    patch_size: int
    tubelet_size: int | None
    embed_dim: int

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks."""
        return self.owner.blocks


def _find_owner(model: nn.Module) -> nn.Module:

    if isinstance(model, Encoder):
        return model.vit
    if hasattr(model, "blocks"):
        return model
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "blocks"):
        return backbone
    raise ValueError(
        f"model {type(model).__name__} has no `blocks` or `backbone.blocks`; tuners need a ViT in "
        "the timm/DINO layout (patch_embed, cls_token, pos_embed, blocks[i].attn.qkv, ...)"
    )


def vit_parts(model: nn.Module) -> ViTParts:
    """The :class:`ViTParts` of ``model`` (an ``Encoder`` or a bare timm/DINO ViT).

    Raises:
        ValueError: naming the first missing attribute.
    """

    owner = _find_owner(model)
    for attr in ("patch_embed", "blocks"):
        if not hasattr(owner, attr):
            raise ValueError(f"model {type(owner).__name__} has no `{attr}` (timm/DINO ViT layout)")
    if isinstance(model, Encoder):
        return ViTParts(owner, model.num_prefix_tokens, model.patch_size, model.tubelet_size,
                        model.embed_dim)  # fmt: skip
    patch_embed = owner.patch_embed
    patch_embed = getattr(patch_embed, "base_layer", patch_embed)
    size = getattr(patch_embed, "patch_size", None)
    if size is None:
        raise ValueError(f"{type(owner).__name__}.patch_embed has no `patch_size`")
    size = (size,) if isinstance(size, int) else tuple(int(s) for s in size)
    tubelet = size[0] if len(size) == 3 else None
    spatial = size[-2:] if len(size) >= 2 else size
    if len(set(spatial)) != 1:
        raise ValueError(f"tuners need square patches, got patch_size {size}")
    if hasattr(owner, "num_prefix_tokens"):
        num_prefix = int(owner.num_prefix_tokens)
    else:
        num_prefix = int(getattr(owner, "cls_token", None) is not None)
    embed_dim = getattr(owner, "embed_dim", None) or owner.blocks[0].attn.qkv.in_features
    return ViTParts(owner, num_prefix, int(spatial[0]), tubelet, int(embed_dim))


def check_block_contract(parts: ViTParts, block_indices: list[int]) -> None:
    """Check the timm/DINO block layout of ``block_indices``, naming the first missing attribute.

    Raises:
        ValueError: e.g. ``blocks[0].attn has no `qkv```, or a block index out of range.
    """
    depth = len(parts.blocks)
    bad = [i for i in block_indices if not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"target blocks {bad} out of range for a {depth}-block ViT; use indices in "
            f"[0, {depth - 1}]"
        )
    for i in block_indices:
        block = parts.blocks[i]
        block = getattr(block, "base_layer", block)
        for attr in ("norm1", "attn", "norm2", "mlp"):
            if not hasattr(block, attr):
                raise ValueError(f"blocks[{i}] ({type(block).__name__}) has no `{attr}`")
        for attr in ("qkv", "proj", "num_heads"):
            if not hasattr(block.attn, attr):
                raise ValueError(f"blocks[{i}].attn ({type(block.attn).__name__}) has no `{attr}`")
        if not isinstance(block.attn.qkv, nn.Linear):
            raise ValueError(
                f"blocks[{i}].attn.qkv is a {type(block.attn.qkv).__name__}, not a Linear"
            )


# ---- names ---------------------------------------------------------------------------------------
Prefix = str | tuple[str, ...]


def is_adapter_parameter(name: str, prefix: Prefix, adapter_name: str | None = None) -> bool:
    """True when ``name`` is under ``<prefix>...`` (one of the prefixes, if a tuple) and under
    that adapter name, if given."""
    if not prefix:
        return False
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith(prefix) and (adapter_name is None or parts[i + 1] == adapter_name):
            return True
    return False


def strip_adapter_name(key: str, prefix: Prefix, adapter_name: str) -> str:
    """``a.deflect_upe.<adapter>.w`` -> ``a.deflect_upe.w`` (saved keys do not carry the name)."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith(prefix) and parts[i + 1] == adapter_name:
            return ".".join(parts[: i + 1] + parts[i + 2 :])
    return key


def insert_adapter_name(key: str, prefix: Prefix, adapter_name: str) -> str:
    """Inverse of :func:`strip_adapter_name`."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if prefix and part.startswith(prefix):
            return ".".join(parts[: i + 1] + [adapter_name] + parts[i + 1 :])
    return key


def summarise_names(names: list[str], limit: int = 40) -> str:
    """Module names with block numbers folded (``blocks.*.attn.qkv``), for error messages."""
    folded = sorted({re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in names if n})
    text = ", ".join(folded[:limit])
    return text + (f", ... ({len(folded) - limit} more)" if len(folded) > limit else "")


def _has_parameters(module: nn.Module, recurse: bool = True) -> bool:
    return next(module.parameters(recurse=recurse), None) is not None


def match_modules(model: nn.Module, patterns: list[str], what: str) -> list[str]:
    """Names of the modules of ``model`` with parameters that equal or end with
    (``.``-separated) each pattern.

    Raises:
        ValueError: a pattern that matches no module, or only modules without parameters (e.g.
            an ``Identity`` left where a pruned layer was), listing the model's module names.
    """
    modules = dict(model.named_modules())
    found: list[str] = []
    for pattern in patterns:
        hits = [n for n in modules if n == pattern or n.endswith("." + pattern)]
        if not hits:
            raise ValueError(
                f"{what} entry {pattern!r} matches no module of {type(model).__name__}; its "
                f"modules are: {summarise_names(list(modules))}"
            )
        with_params = [n for n in hits if _has_parameters(modules[n])]
        if not with_params:
            empty = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in hits[:6])
            raise ValueError(
                f"{what} entry {pattern!r} matches only modules without parameters: {empty}"
                f"{', ...' if len(hits) > 6 else ''}; nothing would train. Modules with "
                f"parameters: "
                f"{summarise_names([n for n, m in modules.items() if _has_parameters(m, False)])}"
            )
        found += [h for h in with_params if h not in found]
    return found


def layer_norm_parameters(model: nn.Module) -> list[str]:
    """Names of the weight and bias of every ``nn.LayerNorm`` (timm's subclasses included)."""
    return [
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules()
        if isinstance(module, nn.LayerNorm)
        for param_name, _ in module.named_parameters(recurse=False)
    ]


# ---- the tuner -----------------------------------------------------------------------------------
class BaseTuner:
    """Injects one method's adapters into a model in place, and manages them.

    Subclasses set :attr:`prefix` and implement :meth:`_inject` (methods that add modules) and/or
    :meth:`select_parameters` (methods that train base parameters in place). Not an ``nn.Module``:
    it holds a reference to the model it adapts.

    Args:
        model: the model to adapt: a framework ``Encoder`` or a bare timm/DINO ViT.
        data: what the input holds; defaults to the encoder's own. Needed by methods that read
            the bands (DEFLECT).
        pretrained_bands: bands of the pretrained patch embedding; defaults to the encoder's
            own, or B4, B3, B2 for a bare ViT.
    """

    #: name prefix of this method's adapter modules ("" for methods without adapter modules).
    prefix: ClassVar[str] = ""
    #: whether the method needs a DataSpec (it reads band names or statistics).
    needs_data: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        data: DataSpec | None = None,
        pretrained_bands: list[str] | None = None,
    ) -> None:
        self.model = model
        if isinstance(model, Encoder):
            if data is not None and data.differences(model.data):
                raise ValueError(
                    f"the data given to the tuner differ from encoder {model.name}'s: "
                    + "; ".join(data.differences(model.data))
                )
            if pretrained_bands is not None and list(pretrained_bands) != model.pretrained_bands:
                raise ValueError(
                    f"pretrained_bands {list(pretrained_bands)} differ from encoder "
                    f"{model.name}'s {model.pretrained_bands}"
                )
            data, pretrained_bands = model.data, list(model.pretrained_bands)
        elif pretrained_bands is None and data is not None:
            pretrained_bands = list(RGB_BANDS)
        self.data = data
        self.pretrained_bands = list(pretrained_bands) if pretrained_bands is not None else None
        if self.data is not None and self.pretrained_bands is not None:
            self.data.index_of(self.pretrained_bands, "the pretrained patch embedding")
        self.configs: dict[str, TunerConfig] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self._selected: dict[str, list[str]] = {}  # adapter -> base tensors trained in place
        self._originals: dict[str, torch.Tensor] = {}  # pretrained values (CPU) of those tensors
        self._tuned: dict[str, dict[str, torch.Tensor]] = {}  # values of adapters not live
        self._live: str | None = None  # whose values the selected tensors hold (None: pretrained)
        self._merged: list[str] = []  # adapters folded into the weights (merge_adapter)

    @property
    def prefixes(self) -> tuple[str, ...]:
        """Name prefixes of every module this tuner adds: the method's own and the band
        strategy's kernels."""
        return tuple(p for p in (self.prefix, BAND_PREFIX) if p)

    # ---- injection -------------------------------------------------------------------------------
    def inject(self, config: TunerConfig, adapter_name: str = "default") -> None:
        """Add adapter ``adapter_name`` for ``config`` to the model (in place)."""
        if adapter_name in self.configs:
            raise ValueError(f"adapter {adapter_name!r} already exists; pick another name")
        if "." in adapter_name or not adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} must be non-empty and without '.'")
        bands = isinstance(config, BandStrategyConfig) and config.band_strategy != "rgb"
        if (self.needs_data or bands) and self.data is None:
            what = f"band_strategy={config.band_strategy}" if bands else f"method {config.method!r}"
            raise ValueError(
                f"{what} reads the input bands: pass data=DataSpec(bands=..., "
                "mean=..., std=..., reflectance_scale=...) to get_deflect_model, or adapt a "
                "framework Encoder (it carries its DataSpec)"
            )
        config = self.resolve_config(config)
        # Values of the adapter that is live now go aside first: the new adapter's pretrained
        # values are the originals, captured while they are in the tensors.
        live = self._live
        self._swap_in(None)
        replaced = self._inject_band_kernel(config, adapter_name) if bands else None
        save = match_modules(self.model, config.modules_to_save, "modules_to_save")
        keys = self.model.state_dict().keys()
        from_modules = [k for m in save for k in keys if k.startswith(m + ".")]
        selected = list(dict.fromkeys([*self.select_parameters(config), *from_modules]))
        # Only the GFM's own tensors; the pretrained kernel does not run for this adapter (its
        # band kernel does), so it does not train either.
        selected = [n for n in selected if self.is_base_parameter(n) and n != replaced]
        keep = getattr(config, "keep_pretrained", True)
        for name in selected:
            if name not in self._originals and keep:
                self._originals[name] = self._tensor(name).detach().to("cpu", copy=True)
        self._selected[adapter_name] = selected
        self._tuned[adapter_name] = {}
        self._inject(config, adapter_name)
        self.configs[adapter_name] = config
        self._swap_in(live)
        if self.active_adapter is None:
            self.set_adapter(adapter_name)
        else:
            self.mark_trainable(self.active_adapter)

    def resolve_config(self, config: TunerConfig) -> TunerConfig:
        """The config as stored and saved, with data-dependent choices made explicit (here:
        whether a band strategy's kernel trains)."""
        if isinstance(config, BandStrategyConfig) and config.train_patch_embed is None:
            trains = config.band_strategy == "rgb_random" or (
                config.band_strategy != "rgb" and config.method == "full"
            )
            return replace(config, train_patch_embed=trains)
        return replace(config)

    def _inject_band_kernel(self, config: BandStrategyConfig, adapter_name: str) -> str:
        """Wrap ``patch_embed`` in a :class:`~deflect.tuners.bands.BandPatchEmbed` (once) and
        give it this adapter's kernel over every band; return the pretrained kernel's name."""

        parts = vit_parts(self.model)
        patch_embed = parts.owner.patch_embed
        path = next(n for n, m in self.model.named_modules() if m is patch_embed)
        if not isinstance(patch_embed, BandPatchEmbed):
            if getattr(patch_embed, "takes_all_bands", False):
                raise ValueError(
                    f"{type(patch_embed).__name__} already takes every band; band_strategy "
                    f"{config.band_strategy!r} cannot wrap it"
                )
            conv = find_patch_conv(patch_embed, len(self.pretrained_bands))
            index = self.data.index_of(self.pretrained_bands, "the pretrained patch embedding")
            patch_embed = BandPatchEmbed(patch_embed, conv, index)
            parts.owner.patch_embed = patch_embed
            self._rename_base_tensors(f"{path}.", f"{path}.base_layer.")
        pretrained = patch_embed.base_layer.get_parameter(patch_embed.kernel_key)
        weight = band_kernel(
            pretrained, list(self.data.bands), self.pretrained_bands, config.band_strategy
        )
        patch_embed.bands_kernel[adapter_name] = BandKernel(weight, bool(config.train_patch_embed))
        return f"{path}.base_layer.{patch_embed.kernel_key}"

    def band_kernel_count(self, config: TunerConfig) -> int:
        """Trainable parameters of the band strategy's kernel under ``config`` (resolved)."""
        if not isinstance(config, BandStrategyConfig) or config.band_strategy == "rgb":
            return 0
        if not config.train_patch_embed:
            return 0

        patch_embed = vit_parts(self.model).owner.patch_embed
        patch_embed = getattr(patch_embed, "base_layer", patch_embed)
        conv = patch_embed.get_submodule(find_patch_conv(patch_embed, len(self.pretrained_bands)))
        return conv.weight[:, :1].numel() * self.data.num_bands

    def _rename_base_tensors(self, old: str, new: str) -> None:
        """Keep the bookkeeping of earlier adapters when a base module moves under a wrapper."""

        def rename(name: str) -> str:
            return new + name[len(old) :] if name.startswith(old) else name

        self._selected = {a: [rename(n) for n in names] for a, names in self._selected.items()}
        self._originals = {rename(n): v for n, v in self._originals.items()}
        self._tuned = {a: {rename(n): v for n, v in t.items()} for a, t in self._tuned.items()}

    def _inject(self, config: TunerConfig, adapter_name: str) -> None:
        """Create and wrap this method's layers (nothing for methods without adapter modules)."""

    def select_parameters(self, config: TunerConfig) -> list[str]:
        """Names of the base parameters this method trains in place (none by default)."""
        return []

    # ---- the single source of truth ----------------------------------------------------------------
    def adapter_tensor_names(self, adapter_name: str) -> list[str]:
        """State-dict keys (in the model's namespace) that make up adapter ``adapter_name``: its
        own modules' tensors and the base tensors it trains in place."""
        if adapter_name not in self.configs:
            raise ValueError(f"no adapter {adapter_name!r}; adapters: {list(self.configs)}")
        added = [
            k
            for k in self.model.state_dict()
            if is_adapter_parameter(k, self.prefixes, adapter_name)
        ]
        return added + self._selected[adapter_name]

    def adapter_parameter_names(self, adapter_name: str) -> list[str]:
        """The parameters among :meth:`adapter_tensor_names` (what trains)."""
        params = dict(self.model.named_parameters())
        return [n for n in self.adapter_tensor_names(adapter_name) if n in params]

    def is_base_parameter(self, name: str) -> bool:
        """True for the GFM's own parameters (not those of added adapter modules)."""
        return not is_adapter_parameter(name, self.prefixes)

    def mark_trainable(self, adapter_name: str) -> None:
        """``requires_grad`` exactly on the adapter's parameters."""
        trainable = set(self.adapter_parameter_names(adapter_name))
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in trainable)

    # ---- adapter layers and switching ---------------------------------------------------------------
    def adapter_layers(self) -> Iterator[AdapterLayer]:
        """Every adapter layer in the model."""
        for module in self.model.modules():
            if isinstance(module, AdapterLayer):
                yield module

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self.model.get_parameter(name)
        except AttributeError:
            return self.model.get_buffer(name)

    def _swap_in(self, adapter_name: str | None) -> None:
        """Make the selected tensors hold ``adapter_name``'s values (None: the pretrained ones)."""
        if adapter_name == self._live:
            return
        with torch.no_grad():
            if self._live is not None:
                for name in self._selected.get(self._live, []):
                    self._tuned[self._live][name] = self._tensor(name).detach().to("cpu", copy=True)
            for name, value in self._originals.items():
                self._tensor(name).copy_(value)
            if adapter_name is not None:
                for name, value in self._tuned[adapter_name].items():
                    self._tensor(name).copy_(value)
        self._live = adapter_name

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one that runs and trains."""
        if adapter_name not in self.configs:
            raise ValueError(f"no adapter {adapter_name!r}; adapters: {list(self.configs)}")
        for layer in self.adapter_layers():
            layer.active_adapter = adapter_name
        self.active_adapter = adapter_name
        if not self.disabled:
            self._swap_in(adapter_name)
        self.mark_trainable(adapter_name)

    def _check_pretrained_kept(self, action: str) -> None:
        lost = [n for a in self._selected for n in self._selected[a] if n not in self._originals]
        if lost:
            warnings.warn(
                f"{action}: the pretrained values of {len(lost)} tensors trained in place were not "
                "kept (keep_pretrained=false); they stay as trained",
                stacklevel=4,
            )

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the adapters on or off (off: the base model's outputs)."""
        if not enabled:
            self._check_pretrained_kept("disable_adapter")
        for layer in self.adapter_layers():
            layer.disable_adapters = not enabled
        self.disabled = not enabled
        self._swap_in(self.active_adapter if enabled else None)

    # ---- state -------------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors (what :meth:`adapter_tensor_names` lists), keys without the
        adapter name."""
        names = self.adapter_tensor_names(adapter_name)
        state = self.model.state_dict()
        selected = set(self._selected[adapter_name])
        out = {}
        for name in names:
            if name in selected and self._live != adapter_name:
                value = self._tuned[adapter_name].get(name, self._originals.get(name))
                value = state[name] if value is None else value
            else:
                value = state[name]
            out[strip_adapter_name(name, self.prefixes, adapter_name)] = value
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], adapter_name: str) -> None:
        """Load tensors saved by :meth:`adapter_state_dict` into adapter ``adapter_name``.

        Raises:
            KeyError: saved keys the adapter lacks, or adapter keys missing from ``state``.
        """
        expected = {
            strip_adapter_name(n, self.prefixes, adapter_name): n
            for n in self.adapter_tensor_names(adapter_name)
        }
        unexpected, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        if unexpected or missing:
            raise KeyError(
                f"adapter {adapter_name!r} checkpoint does not fit the model: unexpected keys "
                f"{unexpected[:10]}, missing keys {missing[:10]}"
            )
        selected = set(self._selected[adapter_name])
        with torch.no_grad():
            for key, value in state.items():
                name = expected[key]
                target = self._tensor(name)
                if target.shape != value.shape:
                    raise KeyError(
                        f"adapter {adapter_name!r}: {key} has shape {tuple(value.shape)} in the "
                        f"checkpoint, {tuple(target.shape)} in the model"
                    )
                if name in selected and self._live != adapter_name:
                    self._tuned[adapter_name][name] = value.detach().to("cpu", copy=True)
                else:
                    target.copy_(value)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name``; the active one cannot be removed."""
        if adapter_name == self.active_adapter:
            raise ValueError(f"adapter {adapter_name!r} is active; set another one first")
        for layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        self.configs.pop(adapter_name)
        self._selected.pop(adapter_name, None)
        self._tuned.pop(adapter_name, None)
        still = {n for names in self._selected.values() for n in names}
        self._originals = {n: v for n, v in self._originals.items() if n in still}

    # ---- leaving -----------------------------------------------------------------------------------
    def unload(self, keep_merged: bool = False) -> nn.Module:
        """Put every wrapped module and every pretrained value back; return the model.

        Args:
            keep_merged: keep what :meth:`merge` folded into the base weights (PEFT's
                ``merge_and_unload``); by default merged adapters are unmerged first.
        """
        keep = set()
        if keep_merged:
            self._swap_in(self._merged[-1] if self._merged else None)
            keep = {n for a in self._merged for n in self._selected.get(a, [])}
        else:
            self.unmerge()
            self._check_pretrained_kept("unload")
        self._live = None
        with torch.no_grad():
            for name, value in self._originals.items():
                if name not in keep:
                    self._tensor(name).copy_(value)
        for name, module in list(self.model.named_modules()):
            if isinstance(module, AdapterLayer):
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, module.base_layer)
        self.configs.clear()
        self._selected.clear()
        self._tuned.clear()
        self._originals.clear()
        self._merged.clear()
        self.active_adapter = None
        for param in self.model.parameters():
            param.requires_grad_(False)
        return self.model

    # ---- merging -------------------------------------------------------------------------------
    #: whether the method's added modules fold into the base weights (LoRA, SLR).
    mergeable: ClassVar[bool] = False

    def has_added_modules(self, adapter_name: str) -> bool:
        """Whether adapter ``adapter_name`` has modules of the method's own prefix."""
        return bool(self.prefix) and any(
            is_adapter_parameter(n, self.prefix, adapter_name) for n in self.model.state_dict()
        )

    def merge(self) -> nn.Module:
        """Fold the active adapter into the weights, for inference; :meth:`unmerge` undoes it
        exactly.

        LoRA and SLR (:attr:`mergeable`, :meth:`_merge_modules`) fold their update into the
        frozen weights. Base tensors trained in place already hold the adapter. Either way
        ``disable_adapter()`` still gives the pretrained model, and ``unload(keep_merged=True)``
        (``merge_and_unload``) keeps the adapted weights. An activation-space method (DEFLECT)
        warns and leaves the model unchanged. A band strategy's kernel (C input bands, the base
        has P) stays an adapter module.
        """
        name = self.active_adapter
        if name in self._merged:
            log.info("adapter %r is already merged", name)
            return self.model
        if self.has_added_modules(name) and not self.mergeable:
            msg = (
                f"{type(self).__name__}: adapter {name!r} is an activation-space method (its "
                "modules act on token streams): it has no weight delta to merge; the model is "
                "left unchanged"
            )
            warnings.warn(msg, stacklevel=3)
            log.warning(msg)
            return self.model
        if self.disabled:
            raise RuntimeError("merge the adapter outside disable_adapter()")
        self._merge_modules(name)
        self._merged.append(name)
        if any(is_adapter_parameter(n, BAND_PREFIX, name) for n in self.model.state_dict()):
            log.info(
                "adapter %r: the band strategy's patch-embedding kernel takes more bands than the "
                "pretrained one; it stays an adapter module",
                name,
            )
        log.info("merged adapter %r into the weights", name)
        return self.model

    def unmerge(self) -> nn.Module:
        """Undo :meth:`merge`: the base weights are bit for bit what they were before."""
        for name in reversed(self._merged):
            self._unmerge_modules(name)
        self._merged.clear()
        return self.model

    def _merge_modules(self, adapter_name: str) -> None:
        """Fold the added modules of ``adapter_name`` into the base weights (mergeable methods)."""

    def _unmerge_modules(self, adapter_name: str) -> None:
        """Restore the base weights :meth:`_merge_modules` changed, exactly."""

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Extra training losses of the last forward (none by default)."""
        return {}

    def band_usage(self) -> dict[str, str]:
        """What the active adapter does with each input band, for the band table: the band
        strategy's patch embedding (nothing under ``rgb``: the encoder's column says it)."""
        config = self.configs.get(self.active_adapter)
        if not isinstance(config, BandStrategyConfig) or config.band_strategy == "rgb":
            return {}

        bands, pretrained = list(self.data.bands), self.pretrained_bands
        state = "trained" if config.train_patch_embed else "frozen"
        if config.band_strategy == "repeat":
            sources = kernel_sources(bands, pretrained)
            scale = f"{len(pretrained)}/{len(bands)}"
            return {
                b: f"patch embedding ({state}): pretrained {pretrained[s]} kernel x {scale}"
                for b, s in zip(bands, sources)
            }
        return {
            b: f"patch embedding ({state}): "
            + ("pretrained kernel" if b in pretrained else "random kernel")
            for b in bands
        }
