"""UPE: the Untangled Patch Embedding of DEFLECT.

DEFLECT — Thoreau, Marsocci & Derksen, *Parameter-Efficient Adaptation of Geospatial Foundation
Models through Embedding Deflection*, ICCV 2025, arXiv:2503.09493.

The untangled patch embedding keeps two token streams of the same shape ``(B, P+N, D)``
(``P`` prefix tokens such as CLS, ``N`` patches):

* the **geometry stream** x_P: the RGB bands through the frozen pretrained patch embedding,
  positional embedding and CLS token, i.e. exactly the pretrained model's own path (done by the
  wrapped ``patch_embed`` and by timm itself; see :mod:`.layer`);
* the **spectral stream** x_A, built here from all bands: per-pixel features (the normalised bands
  and spyndex indices of the reflectances), pixel-set statistics per patch, a LayerNorm without
  affine and a linear projection to D, the residual bottleneck map T, norm matching to ‖x_P‖ per
  token, and a spectral CLS token (mean of the patch tokens, or learned).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from deflect.tuners.deflect.indices import SpectralIndices

_QUANTILE = re.compile(r"^q(\d{1,2}(?:\.\d+)?)$")


def statistic_quantile(name: str) -> float | None:
    """The quantile in (0, 1) of a statistic name (``q10`` -> 0.1, ``median`` -> 0.5), else None.

    Raises:
        ValueError: ``name`` is neither ``mean``, ``std``, ``min``, ``max``, ``median`` nor ``qNN``.
    """
    if name in ("mean", "std", "min", "max"):
        return None
    if name == "median":
        return 0.5
    match = _QUANTILE.match(name)
    if match and 0 < float(match.group(1)) < 100:
        return float(match.group(1)) / 100
    raise ValueError(
        f"unknown pixel-set statistic {name!r}; use mean, std, min, max, median or qNN "
        "(a percentile in (0, 100), e.g. q10)"
    )


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, F, H, W)`` -> ``(B, F, N, p*p)``, patches in row-major order like timm's tokens."""
    b, f, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(
            f"input of {h}x{w} pixels is not a multiple of the patch size {p}; crop or pad the "
            f"input to a multiple of {p}"
        )
    x = x.reshape(b, f, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5)  # (B, F, Hp, Wp, p, p)
    return x.reshape(b, f, (h // p) * (w // p), p * p)


def pixel_set_statistics(
    features: torch.Tensor,
    patch_size: int,
    stats: list[str],
    pixels_per_patch: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Statistics of the pixel set of every patch, for every feature.

    Vectorised over batch, features and patches: one sort along the pixel axis gives min, max and
    every quantile (linear interpolation, as ``numpy.quantile``'s default); ``std`` is the
    population standard deviation (``ddof=0``), so a single sampled pixel gives 0, not NaN.

    Args:
        features: per-pixel features ``(B, F, H, W)``.
        patch_size: patch size p in pixels.
        stats: statistic names (see :func:`statistic_quantile`).
        pixels_per_patch: if set, use k pixels per patch drawn at random without replacement
            (the same pixels for every feature of a patch).
        generator: random generator for the sampling.

    Returns:
        ``(B, N, F*S)``, feature-major: all statistics of feature 0, then of feature 1, ...
    """
    pixels = patchify(features, patch_size)  # (B, F, N, P)
    b, f, n, p = pixels.shape
    if pixels_per_patch is not None and pixels_per_patch < p:
        noise = torch.rand(b, 1, n, p, device=pixels.device, generator=generator)
        keep = noise.argsort(dim=-1)[..., :pixels_per_patch].expand(b, f, n, pixels_per_patch)
        pixels = pixels.gather(-1, keep)  # (B, F, N, k)
        p = pixels_per_patch
    ordered = pixels.sort(dim=-1).values  # (B, F, N, P)
    out = []
    for name in stats:
        if name == "mean":
            out.append(pixels.mean(dim=-1))
        elif name == "std":
            out.append(pixels.std(dim=-1, correction=0))
        elif name == "min":
            out.append(ordered[..., 0])
        elif name == "max":
            out.append(ordered[..., -1])
        else:
            position = statistic_quantile(name) * (p - 1)
            lo = int(position)
            hi = min(lo + 1, p - 1)
            frac = position - lo
            out.append(ordered[..., lo] + (ordered[..., hi] - ordered[..., lo]) * frac)
    values = torch.stack(out, dim=-1)  # (B, F, N, S)
    return values.permute(0, 2, 1, 3).reshape(b, n, f * len(stats))  # (B, N, F*S)


class SpectralMap(nn.Module):
    """The map T of UPE: a residual bottleneck MLP, x̃ = e + W₂ GELU(W₁ e)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """``(B, N, D) -> (B, N, D)``."""
        return e + self.fc2(F.gelu(self.fc1(e)))


class UntangledPatchEmbedding(nn.Module):
    """The trainable spectral stream of UPE for one adapter.

    :meth:`forward` gives the spectral patch tokens before norm matching (computed from the input
    bands alone, inside ``patch_embed``); :meth:`finish` adds the spectral CLS token and matches
    norms with the geometry stream once that exists (at the input of ``blocks[0]``).

    Args:
        bands: names of the input channels.
        embed_dim: ViT width D.
        patch_size: patch size p.
        indices: spyndex index names (already resolved).
        raw_bands: include the normalised bands among the per-pixel features.
        stats: pixel-set statistic names.
        hidden_dim: hidden width of T.
        band_mean, band_std: per-band statistics of the data pipeline's normalisation, or None when
            the data is not normalised.
        reflectance_scale: the stored value of reflectance 1 (1 or 10000).
        pixels_per_patch: random pixel subsampling per patch, training only.
        norm_match: rescale every spectral token to the norm of its geometry token.
        cls_token: ``mean`` (mean of the spectral patch tokens) or ``learned``.
        eps: floor of norms in divisions.
        sensor, nir_from_b8a, index_clamp: see :class:`SpectralIndices`.
    """

    def __init__(
        self,
        bands: list[str],
        embed_dim: int,
        patch_size: int,
        indices: list[str],
        raw_bands: bool = True,
        stats: list[str] | None = None,
        hidden_dim: int = 8,
        band_mean: dict[str, float] | None = None,
        band_std: dict[str, float] | None = None,
        reflectance_scale: float = 1.0,
        pixels_per_patch: int | None = None,
        norm_match: bool = True,
        cls_token: str = "mean",
        eps: float = 1e-6,
        sensor: str = "sentinel2a",
        nir_from_b8a: bool = False,
        index_clamp: float = 10.0,
    ) -> None:
        super().__init__()
        self.bands = list(bands)
        self.patch_size = patch_size
        self.raw_bands = raw_bands
        self.stats = list(stats or ["mean", "std", "min", "max", "q10", "q25", "q75", "q90"])
        self.pixels_per_patch = pixels_per_patch
        self.norm_match = norm_match
        self.eps = eps
        self.reflectance_scale = float(reflectance_scale)
        self.indices = SpectralIndices(indices, self.bands, sensor, nir_from_b8a, index_clamp)
        mean = [band_mean[b] for b in self.bands] if band_mean else [0.0] * len(self.bands)
        std = [band_std[b] for b in self.bands] if band_std else [1.0] * len(self.bands)
        self.register_buffer("band_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("band_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.num_features = len(self.bands) * raw_bands + len(indices)  # F
        if self.num_features == 0:
            raise ValueError("UPE has no per-pixel feature: set raw_bands=true or give indices")
        in_dim = self.num_features * len(self.stats)  # F*S
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False)
        self.projection = nn.Linear(in_dim, embed_dim)
        self.spectral_map = SpectralMap(embed_dim, hidden_dim)
        self.cls_token = nn.Parameter(torch.zeros(embed_dim)) if cls_token == "learned" else None

    def pixel_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel features F(X) ``(B, F, H, W)`` in fp32 from the normalised bands ``(B, C, H, W)``."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            reflectance = (x * self.band_std + self.band_mean) / self.reflectance_scale
            parts = [x] if self.raw_bands else []
            if self.indices.names:
                parts.append(self.indices(reflectance))
            return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Spectral patch tokens before norm matching: ``(B, C, H, W) -> (B, N, D)``."""
        with torch.no_grad():  # the data, not the adapter, decides these: no graph to keep
            features = self.pixel_features(x)  # (B, F, H, W)
            k = self.pixels_per_patch if self.training else None
            statistics = pixel_set_statistics(features, self.patch_size, self.stats, k)
        statistics = statistics.to(self.projection.weight.dtype)  # (B, N, F*S)
        return self.spectral_map(self.projection(self.norm(statistics)))  # (B, N, D)

    def finish(self, tokens: torch.Tensor, x_p: torch.Tensor, num_prefix: int) -> torch.Tensor:
        """Add the spectral prefix (CLS) tokens and match norms with the geometry stream.

        Args:
            tokens: spectral patch tokens ``(B, N, D)`` from :meth:`forward`.
            x_p: the geometry stream at the input of ``blocks[0]`` ``(B, P+N, D)``.
            num_prefix: number P of prefix tokens (CLS, registers) of the ViT.

        Returns:
            the spectral stream x̃_A ``(B, P+N, D)``.
        """
        b, n, d = tokens.shape
        if x_p.shape[1] != num_prefix + n or x_p.shape[-1] != d:
            raise RuntimeError(
                f"DEFLECT spectral stream has {n} patch tokens but the input of blocks[0] has shape "
                f"{tuple(x_p.shape)} with {num_prefix} prefix tokens; token dropping (patch_drop) "
                "and input padding are not supported"
            )
        if num_prefix:
            if self.cls_token is not None:
                cls = self.cls_token.view(1, 1, d).expand(b, num_prefix, d)
            else:
                cls = tokens.mean(dim=1, keepdim=True).expand(b, num_prefix, d)
            tokens = torch.cat([cls, tokens], dim=1)  # (B, P+N, D)
        if self.norm_match:
            target = x_p.norm(dim=-1, keepdim=True).to(tokens.dtype)  # (B, P+N, 1)
            tokens = tokens * target / tokens.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        return tokens

    def extra_repr(self) -> str:
        return (
            f"bands={self.bands}, stats={self.stats}, num_features={self.num_features}, "
            f"pixels_per_patch={self.pixels_per_patch}, norm_match={self.norm_match}"
        )
