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

from deflect.data import DataSpec
from deflect.encoders.recompute import set_blocks_checkpointing
from deflect.io import atomic_path
from deflect.tuners.base import BaseTuner, vit_parts
from deflect.tuners.config import TunerConfig
from deflect.tuners.registry import get_method

log = logging.getLogger(__name__)

CONFIG_NAME = "deflect_config.json"
MANIFEST_KEY = "band_manifest"  # in CONFIG_NAME: the data the adapter was trained on
WEIGHTS_NAME = "deflect_model.safetensors"
WEIGHTS_NAME_PT = "deflect_model.bin"


def _make_tuner(
    model: nn.Module,
    config: TunerConfig,
    adapter_name: str,
    data: DataSpec | None,
    pretrained_bands: list[str] | None,
) -> BaseTuner:
    tuner = get_method(config.method).tuner_cls(model, data, pretrained_bands)
    tuner.inject(config, adapter_name)
    return tuner


def inject_adapter_in_model(
    config: TunerConfig,
    model: nn.Module,
    adapter_name: str = "default",
    *,
    data: DataSpec | None = None,
    pretrained_bands: list[str] | None = None,
) -> nn.Module:
    """Inject the adapter of ``config`` into ``model`` in place and set trainability; return it.

    Without the :class:`DeflectModel` wrapper there is no save/load or adapter switching; use
    :func:`get_deflect_model` for those.
    """
    _make_tuner(model, config, adapter_name, data, pretrained_bands)
    return model


def get_deflect_model(
    model: nn.Module,
    config: TunerConfig,
    adapter_name: str = "default",
    *,
    data: DataSpec | None = None,
    pretrained_bands: list[str] | None = None,
) -> DeflectModel:
    """Adapt ``model`` with ``config``'s method.

    Args:
        model: a framework :class:`~deflect.encoders.Encoder` (it carries its data description
            and pretrained bands) or a bare timm/DINO ViT.
        config: a registered method's config.
        adapter_name: name of the first adapter.
        data: what the input holds; needed for a bare ViT by methods that read the bands
            (DEFLECT). An encoder's own is used (and a different one refused).
        pretrained_bands: bands of a bare ViT's pretrained patch embedding (default B4, B3, B2).
    """
    return DeflectModel(model, config, adapter_name, data=data, pretrained_bands=pretrained_bands)


class DeflectModel(nn.Module):
    """A model with tuner adapters injected, PEFT's ``PeftModel`` for this project.

    Args:
        model: the model to adapt (modified in place; kept as ``base_model``).
        config: a registered method's config (:class:`~deflect.tuners.DeflectConfig`, ...).
        adapter_name: name of the first adapter.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TunerConfig,
        adapter_name: str = "default",
        *,
        data: DataSpec | None = None,
        pretrained_bands: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.base_model = model
        self.tuner = _make_tuner(model, config, adapter_name, data, pretrained_bands)

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
        """Fold the active adapter into the weights where the method can, for inference: LoRA
        and SLR fold their low-rank update (and SLR's scales) into the frozen weights; methods
        that train base tensors in place already hold it; DEFLECT warns (it acts on
        activations) and leaves the model unchanged. ``disable_adapter()`` still gives the
        pretrained model; :meth:`unmerge_adapter` undoes the merge bit for bit."""
        self.tuner.merge()
        return self

    def unmerge_adapter(self) -> DeflectModel:
        """Undo :meth:`merge_adapter`: the original weights come back bit for bit."""
        self.tuner.unmerge()
        return self

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter, remove every adapter module, return the base model with the
        merged weights.

        Raises:
            ValueError: an activation-space method (DEFLECT): it has no weights to merge into.
        """
        name = self.active_adapter
        if self.tuner.has_added_modules(name) and not self.tuner.mergeable:
            raise ValueError(
                f"adapter {name!r} ({self.tuner.configs[name].method}) acts on activations and "
                "cannot be merged into the weights; keep the DeflectModel, or save_pretrained()"
            )
        self.tuner.merge()
        return self.tuner.unload(keep_merged=True)

    def set_activation_checkpointing(self, enable: bool = True) -> None:
        """Store only each ViT block's input and recompute its activations in the backward pass
        (:mod:`deflect.encoders.recompute`): the same outputs and gradients, less memory, one
        more forward of the blocks per training step. Works on any adapted timm/DINO ViT; DEFLECT's
        target blocks recompute their update without re-reading the spectral stream."""
        set_blocks_checkpointing(vit_parts(self.base_model).blocks, enable)

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary training losses of the last training forward (DEFLECT soft deflection)."""
        return self.tuner.auxiliary_losses()

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors :meth:`save_pretrained` writes for ``adapter_name`` (default: active)."""
        return self.tuner.adapter_state_dict(adapter_name or self.active_adapter)

    @property
    def data(self) -> DataSpec | None:
        """What the input holds (the band manifest saved with the adapter)."""
        return self.tuner.data

    def adapter_band_usage(self) -> dict[str, str]:
        """What the active adapter does with each input band (for the band table)."""
        return self.tuner.band_usage()

    def band_roles(self) -> dict[str, dict[str, str]]:
        """For each input band, what feeds on it: ``{"pretrained": ..., "adapter": ...}``
        (``-`` for nothing); saved in the band manifest of adapters and checkpoints."""
        data = self.tuner.data
        if data is None:
            return {}
        base = self.base_model
        encoder = base.band_usage() if hasattr(base, "band_usage") else {}
        if not encoder:  # a bare ViT: the pretrained bands by position
            pretrained = self.tuner.pretrained_bands or []
            encoder = {
                b: f"pretrained patch embedding, channel {i}" for i, b in enumerate(pretrained)
            }
        adapter = self.adapter_band_usage()
        return {
            band: {"pretrained": encoder.get(band, "-"), "adapter": adapter.get(band, "-")}
            for band in data.bands
        }

    # ---- parameter counts ----------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, gfm)``: parameters with ``requires_grad`` (after :meth:`set_adapter`,
        exactly the active adapter's, see :meth:`num_adapter_parameters`) and parameters of the
        GFM itself (added adapter modules excluded)."""
        trainable = gfm = 0
        for name, param in self.base_model.named_parameters():
            if param.requires_grad:
                trainable += param.numel()
            if self.tuner.is_base_parameter(name):
                gfm += param.numel()
        return trainable, gfm

    def num_adapter_parameters(self, adapter_name: str | None = None) -> int:
        """Parameters of adapter ``adapter_name`` (default: active), as trained and saved."""
        params = dict(self.base_model.named_parameters())
        names = self.tuner.adapter_parameter_names(adapter_name or self.active_adapter)
        return sum(params[n].numel() for n in names)

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
                tmp.write_text(json.dumps(self._config_record(name), indent=2))
            try:
                from safetensors.torch import save_file
            except ImportError:  # pragma: no cover - safetensors is a dependency
                with atomic_path(folder / WEIGHTS_NAME_PT) as tmp:
                    torch.save(state, tmp)
            else:
                with atomic_path(folder / WEIGHTS_NAME) as tmp:
                    save_file(state, str(tmp), metadata={"format": "pt"})

    def _config_record(self, adapter_name: str) -> dict:
        """The adapter's config and the band manifest (the data it was trained on)."""
        record = self.tuner.configs[adapter_name].to_dict()
        data = self.tuner.data
        record[MANIFEST_KEY] = {
            "data": data.to_dict() if data is not None else None,
            "pretrained_bands": self.tuner.pretrained_bands,
            "band_roles": self.band_roles(),
        }
        return record

    @staticmethod
    def _read_adapter(
        folder: Path,
    ) -> tuple[TunerConfig, dict, dict[str, torch.Tensor]]:
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"no adapter config {config_path}; was it saved with save_pretrained?"
            )
        record = json.loads(config_path.read_text())
        manifest = record.pop(MANIFEST_KEY, None) or {}
        config = TunerConfig.from_dict(record)
        if (folder / WEIGHTS_NAME).is_file():
            from safetensors.torch import load_file

            state = load_file(str(folder / WEIGHTS_NAME))
        elif (folder / WEIGHTS_NAME_PT).is_file():
            state = torch.load(folder / WEIGHTS_NAME_PT, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_NAME_PT} in {folder}")
        return config, manifest, state

    def load_adapter(
        self, model_directory: str | Path, adapter_name: str = "default", is_trainable: bool = False
    ) -> None:
        """Add adapter ``adapter_name`` from ``model_directory/<adapter_name>/`` (not made active)."""
        config, manifest, state = self._read_adapter(Path(model_directory) / adapter_name)
        _check_manifest(manifest, self.tuner.data, self.tuner.pretrained_bands, model_directory)
        self.add_adapter(adapter_name, config)
        self.tuner.load_adapter_state_dict(state, adapter_name)
        if not is_trainable:
            self._freeze_adapter(adapter_name)

    def _freeze_adapter(self, adapter_name: str) -> None:
        params = dict(self.base_model.named_parameters())
        for name in self.tuner.adapter_parameter_names(adapter_name):
            params[name].requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_directory: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> DeflectModel:
        """Adapt ``model`` with the adapter saved in ``model_directory/<adapter_name>/``.

        With ``is_trainable=False`` (PEFT's default) every parameter is frozen (inference). The
        band manifest saved with the adapter describes the input; a framework ``Encoder`` built
        for other bands or statistics is refused, naming the difference.
        """
        from deflect.encoders import Encoder

        config, manifest, state = cls._read_adapter(Path(model_directory) / adapter_name)
        saved = manifest.get("data")
        data = DataSpec.from_dict(saved) if saved is not None else None
        pretrained = manifest.get("pretrained_bands")
        if isinstance(model, Encoder):
            _check_manifest(manifest, model.data, model.pretrained_bands, model_directory)
            data, pretrained = None, None  # the encoder's own (checked equal)
        adapted = cls(model, config, adapter_name, data=data, pretrained_bands=pretrained)
        adapted.tuner.load_adapter_state_dict(state, adapter_name)
        if not is_trainable:
            for param in adapted.base_model.parameters():
                param.requires_grad_(False)
        return adapted


def _check_manifest(
    manifest: dict, data: DataSpec | None, pretrained_bands: list[str] | None, source
) -> None:
    """Refuse an adapter trained on other bands, statistics or pretrained bands than ``data``.

    Raises:
        ValueError: naming each difference.
    """
    problems = []
    saved = manifest.get("data")
    if saved is not None and data is not None:
        problems += DataSpec.from_dict(saved).differences(data)
    saved_bands = manifest.get("pretrained_bands")
    if saved_bands is not None and pretrained_bands is not None and saved_bands != pretrained_bands:
        problems.append(f"pretrained bands {saved_bands} != {pretrained_bands}")
    if problems:
        raise ValueError(
            f"the adapter in {source} was trained on other input than this model takes: "
            + "; ".join(problems)
            + ". Build the encoder with the bands and statistics of the adapter's band manifest"
        )
