"""Scale-MAE (Reed et al., *Scale-MAE: A Scale-Aware Masked Autoencoder for Multiscale
Geospatial Representation Learning*, ICCV 2023): a ViT whose positional embedding knows the
ground sample distance (GSD).

The 2-D sine-cosine embedding of patch (row i, column j) is computed at positions scaled by the
sample's resolution ``res = gsd · gsd_scale``: the first half of the channels encodes ``j·res``,
the second half ``i·res``, each as ``[sin(p·ω_k), cos(p·ω_k)]`` with ``ω_k = 10000^(-k/(D/4))``;
the CLS token's embedding is zero. It is recomputed every forward from the per-sample ``gsd``
the batch carries (or the dataset's), so the released fixed ``pos_embed`` is not used.
"""

from __future__ import annotations

import logging
import warnings

import torch

from deflect.encoders.sincos import sincos_1d
from deflect.encoders.vit import ViTEncoder

log = logging.getLogger(__name__)


def gsd_pos_embed(dim: int, grid: tuple[int, int], res: torch.Tensor) -> torch.Tensor:
    """Scale-MAE's positional embedding of a ``grid`` (rows, cols) of patches for per-sample
    resolutions ``res`` (B,): ``(B, rows·cols, dim)`` in float64, tokens in row-major order."""
    if dim % 4:
        raise ValueError(f"Scale-MAE positional embedding needs a width divisible by 4, got {dim}")
    rows, cols = grid
    i = torch.arange(rows, device=res.device).repeat_interleave(cols)  # (N,) row of each token
    j = torch.arange(cols, device=res.device).repeat(rows)  # (N,) column of each token
    res = res.double()[:, None]  # (B, 1)
    return torch.cat([sincos_1d(dim // 2, j * res), sincos_1d(dim // 2, i * res)], dim=-1)


class ScaleMAEEncoder(ViTEncoder):
    """A timm ViT with Scale-MAE's GSD-aware positional embedding (arguments of
    :class:`~deflect.encoders.ViTEncoder`, plus ``gsd_scale``).

    Args:
        gsd_scale: ``res = gsd (m) · gsd_scale`` (1: resolution in metres, torchgeo's use of the
            released weights).
    """

    metadata_keys = ("gsd",)

    def __init__(self, *args, gsd_scale: float = 1.0, **kwargs) -> None:
        arch_kwargs = dict(kwargs.pop("arch_kwargs", None) or {})
        arch_kwargs["pos_embed"] = "none"  # computed from the GSD every forward
        super().__init__(*args, arch_kwargs=arch_kwargs, **kwargs)
        self.gsd_scale = float(gsd_scale)
        if self.data.gsd is None:
            warnings.warn(
                f"encoder {self.name}: the dataset gives no GSD; Scale-MAE's positional "
                "embedding uses 1 m for samples without one. Set dataset.gsd",
                stacklevel=2,
            )
        self._res: torch.Tensor | None = None
        self.backbone._pos_embed = self._gsd_pos_embed  # timm calls it inside its forward

    def is_unused_key(self, key: str) -> bool:
        """The released fixed ``pos_embed`` too: it is recomputed from the GSD."""
        return key == "pos_embed" or super().is_unused_key(key)

    def _gsd_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` patch tokens -> ``(B, 1 + N, D)`` with CLS and the GSD embedding."""
        b, n, d = x.shape
        grid = (self.img_size // self.patch_size, self.img_size // self.patch_size)
        if grid[0] * grid[1] != n:
            raise ValueError(f"encoder {self.name}: {n} tokens for a {grid} patch grid")
        res = self._res if self._res is not None else x.new_full((b,), self.data.gsd or 1.0)
        pos = gsd_pos_embed(d, grid, res.to(x.device) * self.gsd_scale).to(x.dtype)
        cls = self.backbone.cls_token.expand(b, -1, -1)  # its positional embedding is zero
        return self.backbone.pos_drop(torch.cat([cls, x + pos], dim=1))

    def forward_features(self, x: torch.Tensor, **metadata) -> list[torch.Tensor]:
        """Feature maps at ``output_layers``; ``gsd`` (B,) in metres, per sample, if known."""
        return self._with_gsd(super().forward_features, x, metadata)

    def forward_tokens(self, x: torch.Tensor, **metadata) -> torch.Tensor:
        """Every token at the last output layer; ``gsd`` as :meth:`forward_features`."""
        return self._with_gsd(super().forward_tokens, x, metadata)

    def _with_gsd(self, forward, x: torch.Tensor, metadata: dict):
        self.check_metadata(metadata)
        gsd = metadata.get("gsd")
        self._res = None if gsd is None else torch.as_tensor(gsd, dtype=torch.float32).reshape(-1)
        try:
            return forward(x)
        finally:
            self._res = None
