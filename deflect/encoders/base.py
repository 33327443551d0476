"""The encoder contract every GFM family implements (:class:`Encoder`).

The segmentor, the tuners and the band table rely on this contract and on nothing else:

* ``data``: the :class:`~deflect.data.DataSpec` of the input; ``input_bands`` are its bands;
* ``pretrained_bands``: the bands of the pretrained patch embedding, by name, in its order (RGB
  for Scale-MAE or DINO-MC, six HLS bands for Prithvi); they are picked by name from the input;
* ``embed_dim``, ``patch_size``, ``tubelet_size`` (None for a 2-D patch embedding),
  ``img_size``, ``output_layers``, ``out_channels``;
* ``forward_features(x, **metadata) -> list[Tensor]``: NCHW maps at ``output_layers``; the
  metadata (e.g. a per-sample ``gsd``) are those named in ``metadata_keys``;
* ``forward_tokens(x, **metadata) -> Tensor``: every token ``(B, P+N, D)``, prefix tokens
  first, at the last output layer (for image-level heads);
* ``vit``: the module holding ``patch_embed``, ``blocks`` (timm/DINO block layout) and the
  prefix tokens: this is where tuners inject their layers; ``num_prefix_tokens``;
* ``load_checkpoint(path, key_map)``: the family's release layout, with positional-embedding
  resampling (:meth:`resample_pos_embed`) to the configured input size;
* ``set_activation_checkpointing(enable)``: recompute the blocks' activations in the backward
  pass instead of storing them (less memory, one more forward of the blocks per step).

A patch embedding that wants every input band (DEFLECT's untangled patch embedding, the
competitors' band strategies) sets ``takes_all_bands = True``; otherwise :meth:`embed_input`
picks the pretrained bands. Invalid pixels are NaN in the input (see :mod:`deflect.data`); they
reach pretrained layers as 0, the band mean after normalisation.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from deflect.data import DataSpec
from deflect.encoders.checkpoint import DEFAULT_MIN_COVERAGE, load_encoder_checkpoint
from deflect.encoders.recompute import set_blocks_checkpointing

log = logging.getLogger(__name__)


def fill_invalid(x: torch.Tensor) -> torch.Tensor:
    """NaN (invalid pixels) -> 0, the band mean of normalised data; other values untouched."""
    return torch.where(torch.isnan(x), torch.zeros((), dtype=x.dtype, device=x.device), x)


class Encoder(nn.Module):
    """Base class of the framework's encoders: the contract above plus the shared checks.

    Subclasses build their ViT, set it as :attr:`vit`, call :meth:`finish_init`, and implement
    :meth:`forward_features`.

    Args:
        name: short name used in run folders and messages (e.g. ``vit_s16``).
        data: what the input holds (bands, statistics, ...).
        pretrained_bands: bands of the pretrained patch embedding, in its order.
        img_size: input size in pixels; a multiple of ``patch_size``.
        patch_size: patch size in pixels.
        output_layers: blocks whose outputs form the feature pyramid, None (the last block) or
            ``"quarters"`` (see :meth:`finish_init`).
    """

    #: metadata the encoder's forward uses (e.g. ``("gsd",)``); batches provide them by name.
    metadata_keys: ClassVar[tuple[str, ...]] = ()
    #: frames per token of a 3-D (tubelet) patch embedding; None for a 2-D patch embedding.
    tubelet_size: int | None = None

    def __init__(
        self,
        name: str,
        data: DataSpec,
        pretrained_bands: list[str],
        img_size: int,
        patch_size: int,
        output_layers: list[int] | str | None,
    ) -> None:
        super().__init__()
        if not isinstance(data, DataSpec):
            raise TypeError(f"encoder {name}: data must be a DataSpec, got {type(data).__name__}")
        self.name = name
        self.data = data
        self.pretrained_bands = [str(b) for b in pretrained_bands]
        if not self.pretrained_bands:
            raise ValueError(f"encoder {name}: pretrained_bands is empty")
        if img_size % patch_size:
            raise ValueError(
                f"encoder {name}: img_size {img_size} is not a multiple of patch_size "
                f"{patch_size}; set img_size to a multiple of {patch_size}"
            )
        self.img_size = int(img_size)
        self.patch_size = int(patch_size)
        index = data.index_of(
            self.pretrained_bands, f"the pretrained patch embedding of encoder {name}"
        )
        self.register_buffer("pretrained_index", torch.tensor(index), persistent=False)
        if isinstance(output_layers, str) and output_layers != "quarters":
            raise ValueError(
                f"encoder {name}: output_layers={output_layers!r}; give block indices, null (the "
                "last block) or 'quarters' (the last block of each quarter of the depth)"
            )
        self._output_layers = (
            output_layers
            if output_layers is None or isinstance(output_layers, str)
            else [int(i) for i in output_layers]
        )

    # ---- the contract ----------------------------------------------------------------------------
    @property
    def input_bands(self) -> list[str]:
        """Channel names of the input tensor, in order."""
        return list(self.data.bands)

    @property
    def vit(self) -> nn.Module:
        """The module with ``patch_embed``, ``blocks`` and prefix tokens (where tuners inject)."""
        raise NotImplementedError(f"{type(self).__name__} must provide `vit`")

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks tuners adapt (timm/DINO block layout)."""
        return self.vit.blocks

    @property
    def patch_embed(self) -> nn.Module:
        """The (possibly wrapped) patch embedding."""
        return self.vit.patch_embed

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (CLS, registers)."""
        return int(getattr(self.vit, "num_prefix_tokens", 1))

    @property
    def embed_dim(self) -> int:
        """Token width D."""
        return int(self.vit.embed_dim)

    @property
    def out_channels(self) -> list[int]:
        """Channels of each output map."""
        return [self.embed_dim] * len(self.output_layers)

    @property
    def output_layers(self) -> list[int]:
        """Indices of the blocks whose outputs are returned."""
        return list(self._output_layers)

    def finish_init(self, depth: int) -> None:
        """Check ``output_layers`` against the depth (default: the last block; ``quarters``:
        the last block of each quarter, e.g. [2, 5, 8, 11] for 12 blocks)."""
        if self._output_layers is None:
            self._output_layers = [depth - 1]
        elif self._output_layers == "quarters":
            self._output_layers = sorted({max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)})
        bad = [i for i in self._output_layers if not 0 <= i < depth]
        if bad:
            raise ValueError(
                f"encoder {self.name}: output_layers {bad} out of range for a {depth}-block ViT; "
                f"use indices in [0, {depth - 1}]"
            )

    def embed_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the patch embedding gets: every band (NaN kept) for a wrapper that takes all
        bands, else the pretrained bands picked by name with invalid pixels set to 0."""
        if x.shape[1] != self.data.num_bands:
            raise ValueError(
                f"encoder {self.name}: got {x.shape[1]} input channels, expected "
                f"{self.data.num_bands} ({list(self.data.bands)})"
            )
        if getattr(self.patch_embed, "takes_all_bands", False):
            return x
        return fill_invalid(x.index_select(1, self.pretrained_index))

    def check_metadata(self, metadata: dict) -> None:
        """Refuse metadata the encoder does not use (a misspelt key would be ignored silently)."""
        unknown = sorted(set(metadata) - set(self.metadata_keys))
        if unknown:
            raise TypeError(
                f"encoder {self.name} takes metadata {list(self.metadata_keys)}, got {unknown}"
            )

    def forward_features(self, x: torch.Tensor, **metadata) -> list[torch.Tensor]:
        """Feature maps ``(B, embed_dim, H/p, W/p)`` at each of ``output_layers``."""
        raise NotImplementedError

    def forward_tokens(self, x: torch.Tensor, **metadata) -> torch.Tensor:
        """All tokens ``(B, P+N, D)`` (prefix tokens such as CLS first) at the last of
        ``output_layers``: what an image-level head pools."""
        raise NotImplementedError(f"{type(self).__name__} does not give its tokens")

    def forward(self, x: torch.Tensor, **metadata) -> list[torch.Tensor]:
        """Alias of :meth:`forward_features`."""
        return self.forward_features(x, **metadata)

    def set_activation_checkpointing(self, enable: bool = True) -> None:
        """Store only each block's input and recompute its activations during the backward pass
        (:mod:`deflect.encoders.recompute`): the same outputs and gradients with less memory, at
        the cost of one more forward of the blocks per training step. Call it after the tuner
        is applied (``build_model`` does, from the top-level ``activation_checkpointing`` key);
        blocks a tuner wraps later inherit the setting from the block they wrap."""
        set_blocks_checkpointing(self.blocks, enable)

    def band_usage(self) -> dict[str, str]:
        """What the encoder does with each input band (for the band table logged at start)."""
        return {
            band: f"pretrained patch embedding, channel {self.pretrained_bands.index(band)}"
            for band in self.pretrained_bands
        }

    # ---- checkpoints -----------------------------------------------------------------------------
    def resample_pos_embed(
        self, key: str, value: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """Map a checkpoint's positional embedding ``value`` to the shape of ``target``.

        Families override this (2-D grids, 3-D tubelets); the default refuses.

        Raises:
            ValueError: the shapes cannot be mapped.
        """
        raise ValueError(
            f"encoder {self.name}: checkpoint {key} has shape {tuple(value.shape)}, the model "
            f"{tuple(target.shape)}, and {type(self).__name__} cannot resample it"
        )

    #: state-dict keys of positional embeddings (resampled, not copied, when shapes differ).
    pos_embed_keys: ClassVar[tuple[str, ...]] = ("pos_embed",)

    def is_unused_key(self, key: str) -> bool:
        """Whether a checkpoint key belongs to a part the encoder dropped on purpose (e.g. a
        final norm the feature pyramid never uses): logged, not warned about."""
        return False

    #: What the encoder checkpoint supplied (path, tensors loaded of total, coverage, missing
    #: and dropped keys); None on random weights. Recorded in the run's ``metrics.json``.
    checkpoint_report: dict | None = None

    def load_checkpoint(
        self,
        path: str | Path,
        key_map: dict[str, str] | None = None,
        min_coverage: float = DEFAULT_MIN_COVERAGE,
    ) -> None:
        """Load the family's released weights into :attr:`vit` (see
        :func:`~deflect.encoders.checkpoint.load_encoder_checkpoint`)."""
        load_encoder_checkpoint(self, path, key_map, min_coverage)

    def warn_random_weights(self) -> None:
        """The loud warning of an encoder without pretrained weights."""
        msg = (
            f"encoder {self.name}: no checkpoint given (encoder.checkpoint=null), so it runs on "
            "RANDOM weights. A frozen random encoder gives meaningless results; set "
            "encoder.checkpoint=/path/to/weights for real experiments"
        )
        warnings.warn(msg, stacklevel=3)
