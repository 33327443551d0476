"""Prithvi (NASA/IBM): ViTs pretrained by MAE on Harmonized Landsat-Sentinel (HLS) imagery.

* **Prithvi-100M** (Prithvi-EO-1.0, Jakubik et al., 2023): ViT-B/16, 6 HLS bands.
* **Prithvi-EO-2.0** (Szwarcman et al., 2024): ViT-L/16 (300M) or ViT-H/14 (600M), same bands,
  optionally with temporal (year, day of year) and location (lat, lon) embeddings ("TL").

Both embed patches with a 3-D convolution (tubelet 1 frame x 16 x 16 px) and add a fixed 3-D
sine-cosine positional embedding: for frame t, row i, column j, channels ``[0, 6D/16)`` encode
``j``, ``[6D/16, 12D/16)`` encode ``i`` and ``[12D/16, D)`` encode ``t``, each as MAE's 1-D table
``[sin(p·ω_k), cos(p·ω_k)]``; the CLS token's embedding is zero. The table is recomputed for the
configured grid, so the released one (3 or 4 frames at 224 px) is not needed. The encoder has no
final norm: feature maps are the blocks' raw outputs.

Release layouts read as they are: ``Prithvi_100M.pt`` (a plain state dict with the MAE decoder
keys ``decoder_*`` and ``mask_token``) and ``Prithvi_EO_V2_300M*.pt`` (``encoder.*`` and
``decoder.*``); decoder keys are listed in the load warning and dropped.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import nn

from deflect.data import DataSpec
from deflect.encoders.base import Encoder
from deflect.encoders.checkpoint import DEFAULT_MIN_COVERAGE
from deflect.encoders.sincos import sincos_1d

log = logging.getLogger(__name__)

#: HLS bands of Prithvi's patch embedding, in its order (Blue, Green, Red, NIR narrow, SWIR 1,
#: SWIR 2), by their Sentinel-2 names.
PRITHVI_BANDS = ["B2", "B3", "B4", "B8A", "B11", "B12"]
COORDS = {"time": "temporal_coords", "location": "location_coords"}


def sincos_3d_pos_embed(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Prithvi's fixed positional embedding of a ``(frames, rows, cols)`` grid of tubelets:
    ``(frames·rows·cols, dim)`` in float64, tokens frame-major then row-major (as ``Conv3d``
    then ``flatten(2)`` orders them)."""
    if dim % 16:
        raise ValueError(
            f"Prithvi's 3-D positional embedding needs a width divisible by 16, got {dim}"
        )
    frames, rows, cols = grid
    t = torch.arange(frames).repeat_interleave(rows * cols)
    i = torch.arange(rows).repeat_interleave(cols).repeat(frames)
    j = torch.arange(cols).repeat(frames * rows)
    spatial, temporal = dim // 16 * 6, dim // 16 * 4
    return torch.cat([sincos_1d(spatial, j), sincos_1d(spatial, i), sincos_1d(temporal, t)], -1)


class TubeletPatchEmbed(nn.Module):
    """``(B, C, T, H, W) -> (B, T/t · H/p · W/p, D)`` by a ``Conv3d`` with kernel = stride =
    ``(t, p, p)`` (Prithvi's ``patch_embed.proj``)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, tubelet_size: int = 1):
        super().__init__()
        self.patch_size = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class CoordsEmbed(nn.Module):
    """Prithvi-EO-2.0's temporal or location embedding of ``(..., 2)`` coordinates (year and
    day of year, or latitude and longitude in degrees): ``scale · [sincos_{D/2}(a),
    sincos_{D-D/2}(b)]``. ``scale`` is learned (starts at 0.1, the TL release) or fixed at 1."""

    def __init__(self, embed_dim: int, learn_scale: bool) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        if learn_scale:
            self.scale = nn.Parameter(torch.full((1,), 0.1))
        else:
            self.register_buffer("scale", torch.ones(1))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        first = self.embed_dim // 2
        table = torch.cat(
            [sincos_1d(first, coords[..., 0]), sincos_1d(self.embed_dim - first, coords[..., 1])],
            dim=-1,
        )
        return self.scale * table.to(self.scale.dtype)


class PrithviViT(nn.Module):
    """The Prithvi encoder's modules in the release's names (``patch_embed.proj``,
    ``cls_token``, ``blocks.N.*`` as timm's ``Block``, ``temporal_embed_enc.scale``,
    ``location_embed_enc.scale``), without the final norm."""

    num_prefix_tokens = 1

    def __init__(
        self,
        in_chans: int,
        grid: tuple[int, int, int],
        patch_size: int,
        tubelet_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        coords_encoding: Sequence[str],
        coords_scale_learn: bool,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = TubeletPatchEmbed(in_chans, embed_dim, patch_size, tubelet_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        table = sincos_3d_pos_embed(embed_dim, grid).float()
        table = torch.cat([torch.zeros(1, embed_dim), table])[None]  # CLS: zero
        self.register_buffer("pos_embed", table, persistent=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)
        )
        if "time" in coords_encoding:
            self.temporal_embed_enc = CoordsEmbed(embed_dim, coords_scale_learn)
        if "location" in coords_encoding:
            self.location_embed_enc = CoordsEmbed(embed_dim, coords_scale_learn)
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))


class PrithviEncoder(Encoder):
    """Prithvi-100M / Prithvi-EO-2.0 behind the :class:`Encoder` contract.

    Args:
        name: short name for run folders and messages.
        data: what the input holds; its bands must include ``pretrained_bands``.
        pretrained_bands: the six HLS bands of the patch embedding, in its order.
        img_size: input size in pixels (a multiple of ``patch_size``).
        patch_size: spatial patch size.
        num_frames: frames per sample; inputs are ``(B, C, H, W)`` for one frame, or
            ``(B, C, T, H, W)``. The feature maps stack the frames on channels
            (``out_channels = embed_dim · num_frames``).
        embed_dim, depth, num_heads, mlp_ratio: the architecture (ViT-B: 768, 12, 12; ViT-L:
            1024, 24, 16).
        coords_encoding: ``time`` and/or ``location``: Prithvi-EO-2.0 TL's embeddings of each
            sample's ``temporal_coords`` ((B, 2) or (B, T, 2): year, day of year) and
            ``location_coords`` ((B, 2): latitude, longitude). A batch without them skips the
            embedding (warned once).
        coords_scale_learn: the embeddings' scales are parameters (the TL release), else 1.
        output_layers: blocks whose outputs form the feature pyramid (default: the last).
        checkpoint: local path of the released weights, or ``None`` for random weights (warned).
        checkpoint_key_map: regex -> replacement rules applied to checkpoint keys.
        checkpoint_min_coverage: the least share of the encoder's tensors the checkpoint must
            supply (below it, loading is an error: it would train on random weights unseen).
    """

    tubelet_size = 1

    def __init__(
        self,
        name: str,
        data: DataSpec,
        pretrained_bands: list[str] = PRITHVI_BANDS,
        img_size: int = 224,
        patch_size: int = 16,
        num_frames: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        coords_encoding: Sequence[str] = (),
        coords_scale_learn: bool = False,
        output_layers: list[int] | str | None = None,
        checkpoint: str | None = None,
        checkpoint_key_map: dict[str, str] | None = None,
        checkpoint_min_coverage: float = DEFAULT_MIN_COVERAGE,
    ) -> None:
        super().__init__(name, data, list(pretrained_bands), img_size, patch_size, output_layers)
        unknown = sorted(set(coords_encoding) - set(COORDS))
        if unknown:
            raise ValueError(
                f"encoder {name}: coords_encoding {unknown} unknown; use a subset of {list(COORDS)}"
            )
        if num_frames < 1:
            raise ValueError(f"encoder {name}: num_frames must be >= 1, got {num_frames}")
        self.num_frames = int(num_frames)
        self.grid = (self.num_frames, img_size // patch_size, img_size // patch_size)
        self.metadata_keys = tuple(COORDS[c] for c in COORDS if c in coords_encoding)
        self.model = PrithviViT(
            len(self.pretrained_bands), self.grid, patch_size, self.tubelet_size, embed_dim,
            depth, num_heads, mlp_ratio, list(coords_encoding), coords_scale_learn,
        )  # fmt: skip
        self.finish_init(depth)
        last = max(self.output_layers)
        del self.model.blocks[last + 1 :]  # unused blocks get no gradient (DDP under `full`)
        self._pruned_blocks = set(range(last + 1, depth))
        self._warned_missing: set[str] = set()
        self.checkpoint = checkpoint
        if checkpoint:
            self.load_checkpoint(checkpoint, checkpoint_key_map, checkpoint_min_coverage)
        else:
            self.warn_random_weights()

    @property
    def vit(self) -> nn.Module:
        return self.model

    @property
    def out_channels(self) -> list[int]:
        return [self.embed_dim * self.num_frames] * len(self.output_layers)

    def is_unused_key(self, key: str) -> bool:
        """The fixed positional table (recomputed), the final norm and pruned blocks."""
        if key == "pos_embed" or key.startswith("norm."):
            return True
        parts = key.split(".")
        return parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) in self._pruned_blocks

    def band_usage(self) -> dict[str, str]:
        return {
            band: f"pretrained 3-D patch embedding, channel {i}"
            for i, band in enumerate(self.pretrained_bands)
        }

    def _coords(self, name: str, metadata: dict, tokens: torch.Tensor) -> torch.Tensor | None:
        """The temporal or location embedding to add to the patch tokens, or None."""
        key = COORDS[name]
        if key not in self.metadata_keys:
            return None
        coords = metadata.get(key)
        if coords is None:
            if key not in self._warned_missing:
                self._warned_missing.add(key)
                warnings.warn(
                    f"encoder {self.name}: coords_encoding has {name!r} but the batch has no "
                    f"{key}; the {name} embedding is skipped. Use a dataset that gives {key} "
                    f"or drop {name!r} from encoder.coords_encoding",
                    stacklevel=3,
                )
            return None
        b, n, _ = tokens.shape
        coords = torch.as_tensor(coords, device=tokens.device).float()
        if name == "location":
            return self.model.location_embed_enc(coords.reshape(b, 1, 2))  # (B, 1, D)
        per_frame = self.model.temporal_embed_enc(coords.reshape(b, -1, 2))  # (B, T, D)
        if per_frame.shape[1] not in (1, self.num_frames):
            raise ValueError(
                f"encoder {self.name}: temporal_coords has {per_frame.shape[1]} frames, the "
                f"input {self.num_frames}"
            )
        return per_frame.repeat_interleave(n // per_frame.shape[1], dim=1)  # (B, N, D)

    def forward_features(self, x: torch.Tensor, **metadata) -> list[torch.Tensor]:
        """Feature maps ``(B, embed_dim · num_frames, H/p, W/p)`` at ``output_layers``."""
        frames, rows, cols = self.grid
        outs = []
        for h in self._blocks_out(x, metadata):
            patches = h[:, 1:].reshape(len(x), frames, rows, cols, -1)  # frame-major tokens
            outs.append(patches.permute(0, 1, 4, 2, 3).reshape(len(x), -1, rows, cols))
        return outs

    def forward_tokens(self, x: torch.Tensor, **metadata) -> torch.Tensor:
        """Every token ``(B, 1 + T·N, D)`` at the last output layer, CLS first."""
        return self._blocks_out(x, metadata)[-1]

    def _blocks_out(self, x: torch.Tensor, metadata: dict) -> list[torch.Tensor]:
        """The tokens ``(B, 1 + T·N, D)`` after each block of ``output_layers``, in order."""
        self.check_metadata(metadata)
        if x.ndim == 4:
            x = x.unsqueeze(2)  # one frame
        if x.ndim != 5 or x.shape[2] != self.num_frames:
            raise ValueError(
                f"encoder {self.name}: input of shape {tuple(x.shape)}; expected (B, C, H, W) "
                f"or (B, C, {self.num_frames}, H, W) (encoder.num_frames={self.num_frames})"
            )
        vit = self.model
        tokens = vit.patch_embed(self.embed_input(x))  # (B, N, D)
        tokens = tokens + vit.pos_embed[:, 1:].to(tokens.dtype)
        for name in COORDS:
            extra = self._coords(name, metadata, tokens)
            if extra is not None:
                tokens = tokens + extra.to(tokens.dtype)
        cls = (vit.cls_token + vit.pos_embed[:, :1]).to(tokens.dtype).expand(len(x), -1, -1)
        h = torch.cat([cls, tokens], dim=1)
        outs = {}
        for index, block in enumerate(vit.blocks):
            h = block(h)
            if index in self.output_layers:
                outs[index] = h
        return [outs[i] for i in self.output_layers]
