"""What every tuner shares: the adapter-layer base class, the backbone contract, trainability.

Tuners follow Hugging Face PEFT: an adapter *wraps* the layer it adapts (kept as ``base_layer``),
its parameters live under one name prefix (e.g. ``deflect_``) keyed by adapter name, trainability
is decided in one place (:meth:`BaseTuner.mark_trainable`), and every adapter starts as the
identity.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from deflect.tuners.config import TunerConfig

log = logging.getLogger(__name__)


class AdapterLayer(nn.Module):
    """A wrapper around a base module holding adapters keyed by name (PEFT's ``BaseTunerLayer``).

    Unknown attributes fall back to ``base_layer`` so code written for the wrapped module (timm
    reading ``patch_embed.grid_size``, ``blocks[i].attn``, ...) keeps working.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapter: str | None = None
        self.disable_adapters = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def adapter_dicts(self) -> list[nn.ModuleDict]:
        """The ``ModuleDict``s (adapter name -> module) of this layer."""
        return [
            m
            for n, m in self._modules.items()
            if n != "base_layer" and isinstance(m, nn.ModuleDict)
        ]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove one adapter's modules from this layer."""
        for d in self.adapter_dicts():
            if adapter_name in d:
                del d[adapter_name]


def find_vit(model: nn.Module) -> nn.Module:
    """The module holding ``patch_embed`` and ``blocks``: ``model`` itself or ``model.backbone``.

    Raises:
        ValueError: the model has neither ``blocks`` nor ``backbone.blocks``.
    """
    if hasattr(model, "blocks"):
        return model
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "blocks"):
        return backbone
    raise ValueError(
        f"model {type(model).__name__} has no `blocks` or `backbone.blocks`; tuners need a ViT in "
        "the timm/DINO layout (patch_embed, cls_token, pos_embed, blocks[i].attn.qkv, ...)"
    )


def check_vit_contract(vit: nn.Module, block_indices: list[int]) -> None:
    """Check the timm/DINO ViT layout that DEFLECT relies on, naming the first missing attribute.

    Raises:
        ValueError: e.g. ``blocks[0].attn has no `qkv```, or a block index out of range.
    """
    for attr in ("patch_embed", "cls_token", "pos_embed"):
        if not hasattr(vit, attr):
            raise ValueError(f"model {type(vit).__name__} has no `{attr}` (timm/DINO ViT layout)")
    depth = len(vit.blocks)
    bad = [i for i in block_indices if not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"target blocks {bad} out of range for a {depth}-block ViT; use indices in "
            f"[0, {depth - 1}]"
        )
    for i in block_indices:
        block = vit.blocks[i]
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


def is_adapter_parameter(name: str, prefix: str, adapter_name: str | None = None) -> bool:
    """True when ``name`` is under ``<prefix>...`` (and under that adapter name, if given)."""
    if not prefix:
        return False
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith(prefix) and (adapter_name is None or parts[i + 1] == adapter_name):
            return True
    return False


def strip_adapter_name(key: str, prefix: str, adapter_name: str) -> str:
    """``a.deflect_upe.<adapter>.w`` -> ``a.deflect_upe.w`` (saved keys do not carry the name)."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith(prefix) and parts[i + 1] == adapter_name:
            return ".".join(parts[: i + 1] + parts[i + 2 :])
    return key


def insert_adapter_name(key: str, prefix: str, adapter_name: str) -> str:
    """Inverse of :func:`strip_adapter_name`."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if prefix and part.startswith(prefix):
            return ".".join(parts[: i + 1] + [adapter_name] + parts[i + 1 :])
    return key


class BaseTuner:
    """Injects one method's adapters into a model in place, and manages them.

    Subclasses set :attr:`prefix`, implement :meth:`_inject` (create and wrap layers), and
    override :meth:`is_trainable_parameter` where the method trains base parameters.
    Not an ``nn.Module``: it holds a reference to the model it adapts.
    """

    #: name prefix of this method's adapter modules ("" for methods without adapter modules).
    prefix: ClassVar[str] = ""
    #: True for methods that train base weights in place (``full``): they cannot be disabled.
    modifies_base_weights: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.configs: dict[str, TunerConfig] = {}
        self.active_adapter: str | None = None
        self._save_modules: dict[str, list[str]] = {}

    # ---- injection -------------------------------------------------------------------------
    def inject(self, config: TunerConfig, adapter_name: str = "default") -> None:
        """Add adapter ``adapter_name`` for ``config`` to the model (in place)."""
        if adapter_name in self.configs:
            raise ValueError(f"adapter {adapter_name!r} already exists; pick another name")
        if "." in adapter_name or not adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} must be non-empty and without '.'")
        self._save_modules[adapter_name] = self._resolve_modules_to_save(config.modules_to_save)
        self._inject(config, adapter_name)
        self.configs[adapter_name] = config
        if self.active_adapter is None:
            self.set_adapter(adapter_name)

    def _inject(self, config: TunerConfig, adapter_name: str) -> None:
        """Create and wrap this method's layers (nothing for methods without adapters)."""

    def _resolve_modules_to_save(self, patterns: list[str]) -> list[str]:
        names = []
        for pattern in patterns:
            found = [
                n
                for n, _ in self.model.named_modules()
                if n == pattern or n.endswith("." + pattern)
            ]
            if not found:
                msg = f"modules_to_save entry {pattern!r} matches no module of the model"
                warnings.warn(msg, stacklevel=3)
                log.warning(msg)
            names += found
        return names

    # ---- adapter layers ----------------------------------------------------------------------
    def adapter_layers(self) -> Iterator[AdapterLayer]:
        """Every adapter layer in the model."""
        for module in self.model.modules():
            if isinstance(module, AdapterLayer):
                yield module

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one that runs and trains."""
        if adapter_name not in self.configs:
            raise ValueError(f"no adapter {adapter_name!r}; adapters: {list(self.configs)}")
        for layer in self.adapter_layers():
            layer.active_adapter = adapter_name
        self.active_adapter = adapter_name
        self.mark_trainable(adapter_name)

    def enable_adapters(self, enabled: bool) -> None:
        """Switch every adapter layer on or off (off: the base model's outputs)."""
        if self.modifies_base_weights and not enabled:
            warnings.warn(
                f"{type(self).__name__} trains the base weights in place: there is no adapter to "
                "disable, the outputs stay those of the tuned model",
                stacklevel=3,
            )
        for layer in self.adapter_layers():
            layer.disable_adapters = not enabled

    # ---- trainability: the one place that decides it ------------------------------------------
    def is_trainable_parameter(self, name: str, adapter_name: str) -> bool:
        """Whether parameter ``name`` trains under adapter ``adapter_name`` (before modules_to_save)."""
        return is_adapter_parameter(name, self.prefix, adapter_name)

    def mark_trainable(self, adapter_name: str) -> None:
        """Freeze every parameter except the adapter's own and its ``modules_to_save``."""
        save = self._save_modules.get(adapter_name, [])
        for name, param in self.model.named_parameters():
            trainable = self.is_trainable_parameter(name, adapter_name) or any(
                name.startswith(m + ".") for m in save
            )
            param.requires_grad_(trainable)

    # ---- state -----------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors and its ``modules_to_save``, keys without the adapter name."""
        save = self._save_modules.get(adapter_name, [])
        out = {}
        for key, value in self.model.state_dict().items():
            if is_adapter_parameter(key, self.prefix, adapter_name):
                out[strip_adapter_name(key, self.prefix, adapter_name)] = value
            elif any(key.startswith(m + ".") for m in save):
                out[key] = value
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], adapter_name: str) -> None:
        """Load tensors saved by :meth:`adapter_state_dict` into adapter ``adapter_name``.

        Raises:
            KeyError: saved keys the model lacks, or adapter keys missing from ``state``.
        """
        expected = self.adapter_state_dict(adapter_name)
        mapped = {}
        for key, value in state.items():
            if self.prefix and any(p.startswith(self.prefix) for p in key.split(".")[:-1]):
                mapped[insert_adapter_name(key, self.prefix, adapter_name)] = value
            else:
                mapped[key] = value
        unexpected = sorted(set(state) - set(expected))
        missing = sorted(set(expected) - set(state))
        if unexpected or missing:
            raise KeyError(
                f"adapter {adapter_name!r} checkpoint does not fit the model: unexpected keys "
                f"{unexpected[:10]}, missing keys {missing[:10]}"
            )
        result = self.model.load_state_dict(mapped, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"unexpected keys {result.unexpected_keys[:10]}")

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name``; the active one cannot be removed."""
        if adapter_name == self.active_adapter:
            raise ValueError(f"adapter {adapter_name!r} is active; set another one first")
        for layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        self.configs.pop(adapter_name)
        self._save_modules.pop(adapter_name, None)

    # ---- leaving -----------------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """Put every wrapped module back and return the model (adapters discarded)."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, AdapterLayer):
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, module.base_layer)
        self.configs.clear()
        self.active_adapter = None
        return self.model

    def merge(self) -> nn.Module:
        """Fold the active adapter into the base weights where the method allows it."""
        return self.model

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Extra training losses of the last forward (none by default)."""
        return {}
