"""The PEFT-shaped entry points: :class:`DeflectModel`, :func:`get_deflect_model`,
:func:`inject_adapter_in_model`.

``DeflectModel`` is to every method of the registry what PEFT's ``PeftModel`` is to LoRA: it holds
the adapted model (adapters injected in place) as ``base_model``, delegates ``forward`` and any
unknown attribute to it, and adds adapter management, parameter counts and adapter-only save/load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from deflect.io import atomic_path
from deflect.tuners.base import BaseTuner, is_adapter_parameter
from deflect.tuners.config import TunerConfig
from deflect.tuners.registry import get_method

log = logging.getLogger(__name__)

CONFIG_NAME = "deflect_config.json"
WEIGHTS_NAME = "deflect_model.safetensors"
WEIGHTS_NAME_PT = "deflect_model.bin"


def _make_tuner(model: nn.Module, config: TunerConfig, adapter_name: str) -> BaseTuner:
    tuner = get_method(config.method).tuner_cls(model)
    tuner.inject(config, adapter_name)
    return tuner


def inject_adapter_in_model(
    config: TunerConfig, model: nn.Module, adapter_name: str = "default"
) -> nn.Module:
    """Inject the adapter of ``config`` into ``model`` in place and set trainability; return it.

    Without the :class:`DeflectModel` wrapper there is no save/load or adapter switching; use
    :func:`get_deflect_model` for those.
    """
    _make_tuner(model, config, adapter_name)
    return model


def get_deflect_model(
    model: nn.Module, config: TunerConfig, adapter_name: str = "default"
) -> DeflectModel:
    """Adapt ``model`` (a framework ``ViTEncoder`` or a timm ViT) with ``config``'s method."""
    return DeflectModel(model, config, adapter_name)


class DeflectModel(nn.Module):
    """A model with tuner adapters injected, PEFT's ``PeftModel`` for this project.

    Args:
        model: the model to adapt (modified in place; kept as ``base_model``).
        config: a registered method's config (:class:`~deflect.tuners.DeflectConfig`, ...).
        adapter_name: name of the first adapter.
    """

    def __init__(
        self, model: nn.Module, config: TunerConfig, adapter_name: str = "default"
    ) -> None:
        super().__init__()
        self.base_model = model
        self.tuner = _make_tuner(model, config, adapter_name)

    # ---- delegation ----------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The base model's forward (adapters act from inside it)."""
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "tuner"):
                raise
            return getattr(self.base_model, name)

    # ---- adapters ------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, TunerConfig]:
        """Adapter name -> config."""
        return self.tuner.configs

    @property
    def active_adapter(self) -> str | None:
        """Name of the adapter that runs and trains."""
        return self.tuner.active_adapter

    def add_adapter(self, adapter_name: str, config: TunerConfig) -> None:
        """Add another adapter of the same method (not made active; see :meth:`set_adapter`)."""
        methods = {c.method for c in self.tuner.configs.values()}
        if methods and config.method not in methods:
            raise ValueError(
                f"this model holds {sorted(methods)} adapters; cannot add a {config.method!r} one"
            )
        self.tuner.inject(config, adapter_name)
        self.tuner.mark_trainable(self.tuner.active_adapter)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the adapter that runs and trains."""
        self.tuner.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove a (non-active) adapter."""
        self.tuner.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager inside which the model gives the base model's outputs."""
        self.tuner.enable_adapters(False)
        try:
            yield
        finally:
            self.tuner.enable_adapters(True)

    def unload(self) -> nn.Module:
        """Remove every adapter and return the base model with its original modules."""
        return self.tuner.unload()

    def merge_adapter(self) -> DeflectModel:
        """Fold the active adapter into the weights where the method can (not DEFLECT: it warns)."""
        self.tuner.merge()
        return self

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary training losses of the last training forward (DEFLECT soft deflection)."""
        return self.tuner.auxiliary_losses()

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors :meth:`save_pretrained` writes for ``adapter_name`` (default: active)."""
        return self.tuner.adapter_state_dict(adapter_name or self.active_adapter)

    # ---- parameter counts ----------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, gfm)``: trainable parameters of the adapted model (adapters included)
        and parameters of the GFM itself (adapter modules excluded)."""
        trainable = gfm = 0
        for name, param in self.base_model.named_parameters():
            if param.requires_grad:
                trainable += param.numel()
            if not is_adapter_parameter(name, self.tuner.prefix):
                gfm += param.numel()
        return trainable, gfm

    def print_trainable_parameters(
        self, extra_modules: dict[str, nn.Module | int] | None = None
    ) -> str:
        """Print (and return) the trainable count and its % of the GFM's parameters.

        Args:
            extra_modules: modules outside the GFM (e.g. ``{"decoder": head}``) or their trainable
                parameter counts, reported on their own lines, not in the GFM percentage.
        """
        trainable, gfm = self.get_nb_trainable_parameters()
        lines = [
            f"trainable params: {trainable:,} || GFM params: {gfm:,} || "
            f"% of GFM params tuned: {100 * trainable / max(gfm, 1):.4f}"
        ]
        for name, module in (extra_modules or {}).items():
            if isinstance(module, int):
                lines.append(f"{name}: trainable params: {module:,}")
            else:
                n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
                n_all = sum(p.numel() for p in module.parameters())
                lines.append(f"{name}: trainable params: {n_train:,} || all params: {n_all:,}")
        text = "\n".join(lines)
        print(text)
        return text

    # ---- save / load ---------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | Path, adapter_names: list[str] | None = None
    ) -> None:
        """Write each adapter's config and tensors (only) to ``save_directory/<adapter_name>/``."""
        root = Path(save_directory)
        for name in adapter_names or list(self.tuner.configs):
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            state = {
                k: v.detach().cpu().contiguous()
                for k, v in self.tuner.adapter_state_dict(name).items()
            }
            with atomic_path(folder / CONFIG_NAME) as tmp:
                tmp.write_text(json.dumps(self.tuner.configs[name].to_dict(), indent=2))
            try:
                from safetensors.torch import save_file
            except ImportError:  # pragma: no cover - safetensors is a dependency
                with atomic_path(folder / WEIGHTS_NAME_PT) as tmp:
                    torch.save(state, tmp)
            else:
                with atomic_path(folder / WEIGHTS_NAME) as tmp:
                    save_file(state, str(tmp), metadata={"format": "pt"})

    @staticmethod
    def _read_adapter(folder: Path) -> tuple[TunerConfig, dict[str, torch.Tensor]]:
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"no adapter config {config_path}; was it saved with save_pretrained?"
            )
        config = TunerConfig.from_dict(json.loads(config_path.read_text()))
        if (folder / WEIGHTS_NAME).is_file():
            from safetensors.torch import load_file

            state = load_file(str(folder / WEIGHTS_NAME))
        elif (folder / WEIGHTS_NAME_PT).is_file():
            state = torch.load(folder / WEIGHTS_NAME_PT, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_NAME_PT} in {folder}")
        return config, state

    def load_adapter(
        self, model_directory: str | Path, adapter_name: str = "default", is_trainable: bool = False
    ) -> None:
        """Add adapter ``adapter_name`` from ``model_directory/<adapter_name>/`` (not made active)."""
        config, state = self._read_adapter(Path(model_directory) / adapter_name)
        self.add_adapter(adapter_name, config)
        self.tuner.load_adapter_state_dict(state, adapter_name)
        if not is_trainable:
            self._freeze_adapter(adapter_name)

    def _freeze_adapter(self, adapter_name: str) -> None:
        for name, param in self.base_model.named_parameters():
            if is_adapter_parameter(name, self.tuner.prefix, adapter_name):
                param.requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_directory: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> DeflectModel:
        """Adapt ``model`` with the adapter saved in ``model_directory/<adapter_name>/``.

        With ``is_trainable=False`` (PEFT's default) every parameter is frozen (inference).
        """
        config, state = cls._read_adapter(Path(model_directory) / adapter_name)
        adapted = cls(model, config, adapter_name)
        adapted.tuner.load_adapter_state_dict(state, adapter_name)
        if not is_trainable:
            for param in adapted.base_model.parameters():
                param.requires_grad_(False)
        return adapted
