"""The adapter-layer base class every tuner's wrapper derives from, and the band kernels' prefix.

It sits below :mod:`deflect.tuners.base` and :mod:`deflect.tuners.bands` so that both can use it
without importing each other in a circle.
"""

from __future__ import annotations

from torch import nn

#: Name prefix of the competitors' band-strategy kernels (see :mod:`deflect.tuners.bands`).
BAND_PREFIX = "bands_"


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
