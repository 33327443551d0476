"""Base configuration of every tuner (PEFT's ``PeftConfig``).

Configs are plain dataclasses, built by Hydra ``instantiate(cfg, _convert_="all")`` or by hand,
checked in ``__post_init__`` (a config that cannot work fails when it is built), and
JSON-serialisable through :meth:`TunerConfig.to_dict` / :meth:`TunerConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deflect.tuners.registry import get_method


@dataclass
class TunerConfig:
    """What every tuner config has.

    Args:
        method: the registered method name; each subclass fixes it (``deflect``, ``frozen``, ...).
        modules_to_save: names (or ``.``-separated name suffixes) of base modules to train and
            save with the adapter, e.g. ``["blocks.11.norm2"]``. They train in place; their
            pretrained values are kept aside (see :class:`~deflect.tuners.base.BaseTuner`). A
            name that matches no module with parameters is an error.
        encoder_lr_scale: the learning rate of the method's trainable encoder parameters
            relative to the decoder's (``optimizer.lr``), as validation chose it for the method
            (``docs/spectral_study.md``); ``run.py``'s ``encoder_lr_scale`` defaults to it.
            Adapters that start at zero or at random want more than 1; pretrained weights under
            full fine-tuning less.
    """

    method: str = ""
    modules_to_save: list[str] = field(default_factory=list)
    encoder_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        expected = type(self).__dataclass_fields__["method"].default
        if expected and self.method != expected:
            raise ValueError(
                f"{type(self).__name__} is for method {expected!r}, got method={self.method!r}"
            )
        if isinstance(self.modules_to_save, str):
            raise ValueError(
                f"modules_to_save must be a list of module names, got {self.modules_to_save!r}"
            )
        self.modules_to_save = [str(m) for m in self.modules_to_save]
        if isinstance(self.encoder_lr_scale, bool) or not isinstance(
            self.encoder_lr_scale, (int, float)
        ) or not self.encoder_lr_scale > 0:
            raise ValueError(
                f"encoder_lr_scale must be a number above 0, got {self.encoder_lr_scale!r}; "
                "e.g. finetune.encoder_lr_scale=10"
            )
        self.encoder_lr_scale = float(self.encoder_lr_scale)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TunerConfig:
        """Build a config from :meth:`to_dict`'s output.

        On :class:`TunerConfig` itself, the ``method`` key picks the registered config class.

        Raises:
            ValueError: an unknown method or unknown keys.
        """
        data = dict(data)
        if cls is TunerConfig:
            return get_method(str(data.get("method", ""))).config_cls.from_dict(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown keys {unknown}; known: {sorted(names)}")
        return cls(**data)


BAND_STRATEGIES = ("rgb", "repeat", "rgb_random")


@dataclass
class BandStrategyConfig(TunerConfig):
    """What every competitor of DEFLECT shares: how the extra bands reach the patch embedding.

    DEFLECT never changes the pretrained patch embedding (its spectral stream reads every band);
    the competitors (LoRA, SLR, BitFit, norm tuning, frozen, full) see the extra bands only if
    the patch embedding takes them, which ``band_strategy`` decides (docs/method.md, section 5):

    * ``rgb``: only the encoder's pretrained bands (RGB), picked by name; the others are unused;
    * ``repeat``: a patch embedding over all C bands whose kernel is the pretrained one tiled
      over the bands (each pretrained band keeps its own kernel slice; the other bands take the
      pretrained slices in turn), rescaled by P/C (3/C for RGB);
    * ``rgb_random``: the pretrained kernel for the pretrained bands, a random one (PyTorch's
      convolution initialisation) for the rest.

    The new kernel belongs to the adapter (saved with it); the pretrained one stays untouched.

    Args:
        band_strategy: ``rgb``, ``repeat`` or ``rgb_random``.
        train_patch_embed: whether the new kernel trains (``D·C·p²`` parameters). ``None`` (the
            default): it trains under ``rgb_random`` (a random kernel must learn) and ``full``,
            and stays frozen under ``repeat`` for the other methods.
    """

    band_strategy: str = "rgb"
    train_patch_embed: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.band_strategy not in BAND_STRATEGIES:
            raise ValueError(
                f"band_strategy={self.band_strategy!r}: use one of {list(BAND_STRATEGIES)}"
            )
        if self.band_strategy == "rgb" and self.train_patch_embed:
            raise ValueError(
                "train_patch_embed=true needs a band_strategy that builds a new patch embedding "
                "(repeat or rgb_random); with rgb the pretrained one is used as it is (train it "
                "with modules_to_save: [patch_embed.proj])"
            )
