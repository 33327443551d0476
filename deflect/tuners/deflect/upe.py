"""UPE: the Untangled Patch Embedding of DEFLECT.

DEFLECT — Thoreau, Marsocci & Derksen, *Parameter-Efficient Adaptation of Geospatial Foundation
Models through Embedding Deflection*, ICCV 2025, arXiv:2503.09493.

The untangled patch embedding keeps two token streams of the same shape ``(B, P+N, D)``
(``P`` prefix tokens such as CLS, ``N`` patches):

* the **geometry stream** x_P: the encoder's pretrained bands (RGB for an RGB-pretrained GFM),
  picked by name, through the frozen pretrained patch embedding, positional embedding and CLS
  token, i.e. exactly the pretrained model's own path (see :mod:`.layer`);
* the **spectral stream** x_A, built here from all bands: per-pixel features (the normalised bands
  and spyndex indices of the reflectances), pixel-set statistics over the valid pixels of each
  patch, a LayerNorm without affine and a linear projection to D, the residual bottleneck map T,
  norm matching to ‖x_P‖ per patch token, and a spectral CLS token: the mean of the matched patch
  tokens (or a learned token).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from deflect.data import DataSpec
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


def patchify(x: torch.Tensor, patch_size: int, tubelet_size: int | None = None) -> torch.Tensor:
    """Pixels of every patch: ``(B, F, H, W) -> (B, F, N, p*p)``, patches in row-major order
    like timm's tokens; or, for a tubelet (3-D) patch embedding, ``(B, F, T, H, W) ->
    (B, F, N, t*p*p)`` with tokens frame-major (as ``Conv3d`` then ``flatten(2)`` orders them)."""
    p = patch_size
    if x.ndim == 5:
        b, f, frames, h, w = x.shape
        t = tubelet_size or 1
        if frames % t:
            raise ValueError(f"{frames} frames are not a multiple of the tubelet size {t}")
    elif x.ndim == 4:
        b, f, h, w = x.shape
        frames, t = 1, 1
        x = x.unsqueeze(2)
    else:
        raise ValueError(f"expected (B, C, H, W) or (B, C, T, H, W) input, got {tuple(x.shape)}")
    if h % p or w % p:
        raise ValueError(
            f"input of {h}x{w} pixels is not a multiple of the patch size {p}; crop or pad the "
            f"input to a multiple of {p}"
        )
    x = x.reshape(b, f, frames // t, t, h // p, p, w // p, p)
    x = x.permute(0, 1, 2, 4, 6, 3, 5, 7)  # (B, F, T', Hp, Wp, t, p, p)
    return x.reshape(b, f, (frames // t) * (h // p) * (w // p), t * p * p)


def pixel_set_statistics(
    features: torch.Tensor,
    patch_size: int,
    stats: list[str],
    valid: torch.Tensor | None = None,
    pixels_per_patch: int | None = None,
    generator: torch.Generator | None = None,
    tubelet_size: int | None = None,
) -> torch.Tensor:
    """Statistics of the set of valid pixels of every patch, for every feature.

    Vectorised over batch, features and patches: one sort along the pixel axis (invalid pixels
    sorted last) gives min, max and every quantile (linear interpolation between the valid
    pixels, as ``numpy.quantile``'s default); ``std`` is the population standard deviation
    (``ddof=0``), so a single pixel gives 0, not NaN. A patch without a valid pixel for a feature
    gets 0 for every statistic of that feature.

    Args:
        features: per-pixel features ``(B, F, H, W)`` (or ``(B, F, T, H, W)``).
        patch_size: patch size p in pixels.
        stats: statistic names (see :func:`statistic_quantile`).
        valid: booleans of the shape of ``features``; invalid pixels are left out (all valid
            when None).
        pixels_per_patch: if set, use k pixels per patch drawn at random without replacement
            (the same pixels for every feature of a patch; pixels valid for every feature first).
        generator: random generator for the sampling.
        tubelet_size: frames per token of a tubelet patch embedding.

    Returns:
        ``(B, N, F*S)``, feature-major: all statistics of feature 0, then of feature 1, ...
    """
    pixels = patchify(features, patch_size, tubelet_size)  # (B, F, N, P)
    if valid is None:
        mask = torch.ones_like(pixels, dtype=torch.bool)
    else:
        mask = patchify(valid, patch_size, tubelet_size)  # (B, F, N, P)
    b, f, n, p = pixels.shape
    if pixels_per_patch is not None and pixels_per_patch < p:
        noise = torch.rand(b, 1, n, p, device=pixels.device, generator=generator)
        noise = noise + (~mask.all(dim=1, keepdim=True)).to(noise.dtype)  # valid pixels first
        keep = noise.argsort(dim=-1)[..., :pixels_per_patch].expand(b, f, n, pixels_per_patch)
        pixels, mask = pixels.gather(-1, keep), mask.gather(-1, keep)  # (B, F, N, k)
    count = mask.sum(dim=-1)  # (B, F, N)
    denom = count.clamp_min(1).to(pixels.dtype)
    zero = torch.zeros((), dtype=pixels.dtype, device=pixels.device)
    mean = torch.where(mask, pixels, zero).sum(dim=-1) / denom
    ordered = torch.where(mask, pixels, torch.full_like(pixels, torch.inf)).sort(dim=-1).values
    last = (count - 1).clamp_min(0)  # position of the largest valid pixel

    def at(position: torch.Tensor) -> torch.Tensor:
        return ordered.gather(-1, position.unsqueeze(-1)).squeeze(-1)

    out = []
    for name in stats:
        if name == "mean":
            value = mean
        elif name == "std":
            squared = torch.where(mask, (pixels - mean.unsqueeze(-1)).square(), zero)
            value = (squared.sum(dim=-1) / denom).sqrt()
        elif name == "min":
            value = ordered[..., 0]
        elif name == "max":
            value = at(last)
        else:
            position = statistic_quantile(name) * last.to(pixels.dtype)
            lo = position.floor().long()
            hi = torch.minimum(lo + 1, last)
            low = at(lo)
            value = low + (at(hi) - low) * (position - lo.to(pixels.dtype))
        out.append(torch.where(count > 0, value, zero))
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
    bands alone, inside ``patch_embed``); :meth:`finish` matches their norms with the geometry
    stream and adds the spectral CLS token once that stream exists (at the input of
    ``blocks[0]``).

    Invalid pixels (NaN, and values equal to the data's no-data value) enter neither the indices
    nor the statistics. The band statistics are kept as fp32 Python numbers, not module buffers,
    so the index arithmetic stays in fp32 whatever dtype the model is cast to.

    Args:
        data: what the input holds (bands, normalisation statistics, reflectance scale, no-data
            value, sensor).
        embed_dim: ViT width D.
        patch_size: patch size p.
        indices: spyndex index names (already resolved).
        raw_bands: include the normalised bands among the per-pixel features.
        stats: pixel-set statistic names.
        hidden_dim: hidden width of T.
        pixels_per_patch: random pixel subsampling per patch, training only.
        norm_match: rescale every spectral patch token to the norm of its geometry token.
        cls_token: ``mean`` (mean of the matched spectral patch tokens) or ``learned``.
        eps: floor of norms in divisions.
        nir_from_b8a, index_clamp: see :class:`SpectralIndices`.
        tubelet_size: frames per token of a tubelet (3-D) patch embedding, else None.
        standardise_features: z-score every per-pixel feature with its mean and std over the
            valid pixels of the TRAINING batches (accumulated in training mode only, frozen in
            evaluation, saved with the adapter): the indices, in their own units, then weigh
            like the z-scored bands in UPE's statistics. Off by default.
    """

    def __init__(
        self,
        data: DataSpec,
        embed_dim: int,
        patch_size: int,
        indices: list[str],
        raw_bands: bool = True,
        stats: list[str] | None = None,
        hidden_dim: int = 8,
        pixels_per_patch: int | None = None,
        norm_match: bool = True,
        cls_token: str = "mean",
        eps: float = 1e-6,
        nir_from_b8a: bool = False,
        index_clamp: float = 10.0,
        tubelet_size: int | None = None,
        standardise_features: bool = False,
    ) -> None:
        super().__init__()
        self.bands = list(data.bands)
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.raw_bands = raw_bands
        self.stats = list(stats or ["mean", "std", "min", "max", "q10", "q25", "q75", "q90"])
        self.pixels_per_patch = pixels_per_patch
        self.norm_match = norm_match
        self.eps = eps
        self.reflectance_scale = float(data.reflectance_scale)
        self.nodata = data.nodata
        self.band_mean = tuple(data.mean_list())  # fp32 numbers, never cast with the model
        self.band_std = tuple(data.std_list())
        self._band_tensors: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.indices = SpectralIndices(indices, self.bands, data.sensor, nir_from_b8a, index_clamp)
        self.num_features = len(self.bands) * raw_bands + len(indices)  # F
        if self.num_features == 0:
            raise ValueError("UPE has no per-pixel feature: set raw_bands=true or give indices")
        self.standardise_features = standardise_features
        if standardise_features:  # float64 running moments of the training pixels (Chan et al.)
            f = self.num_features
            self.register_buffer("feature_count", torch.zeros(f, dtype=torch.float64))
            self.register_buffer("feature_mean", torch.zeros(f, dtype=torch.float64))
            self.register_buffer("feature_m2", torch.zeros(f, dtype=torch.float64))
        in_dim = self.num_features * len(self.stats)  # F*S
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False)
        self.projection = nn.Linear(in_dim, embed_dim)
        self.spectral_map = SpectralMap(embed_dim, hidden_dim)
        #: Occlusion for diagnostics (``scripts/explain.py``): per-pixel feature index -> the
        #: value that replaces it at its valid pixels, and statistic column (of the F·S) -> its
        #: replacement. Empty in training and evaluation.
        self.occlude_features: dict[int, float] = {}
        self.occlude_statistics: dict[int, float] = {}
        self.cls_token = None
        if cls_token == "learned":
            # Unit norm, not zero: under norm matching the token is divided by its own norm,
            # and a zero start makes its first gradient ~1/eps times the later ones.
            self.cls_token = nn.Parameter(torch.randn(embed_dim) / embed_dim**0.5)

    def _band_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (std, mean) shaped for ``x``, made once per device (not every forward)."""
        key = (x.device, x.ndim)
        if key not in self._band_tensors:
            shape = (1, len(self.bands)) + (1,) * (x.ndim - 2)
            self._band_tensors[key] = tuple(
                torch.tensor(values, dtype=torch.float32, device=x.device).view(shape)
                for values in (self.band_std, self.band_mean)
            )
        return self._band_tensors[key]

    def pixel_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel features F(X) in fp32 (standardised with the training statistics under
        ``standardise_features``; 0 where invalid) and where they are valid."""
        features, valid = self.raw_pixel_features(x)
        return self.standardise(features, valid), valid

    def update_feature_statistics(self, features: torch.Tensor, valid: torch.Tensor) -> None:
        """Merge the valid pixels of ``features`` ``(B, F, ...)`` into the running per-feature
        count, mean and sum of squared deviations (exact pooled moments, in float64)."""
        dims = [d for d in range(features.ndim) if d != 1]
        values = features.double() * valid
        count = valid.double().sum(dims)  # (F,)
        mean = values.sum(dims) / count.clamp_min(1)
        m2 = ((features.double() - mean.view(1, -1, *[1] * (features.ndim - 2))) ** 2
              * valid).sum(dims)  # fmt: skip
        total = self.feature_count + count
        delta = mean - self.feature_mean
        share = count / total.clamp_min(1)
        self.feature_mean += delta * share
        self.feature_m2 += m2 + delta**2 * self.feature_count * share
        self.feature_count.copy_(total)

    def standardise(self, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``(features - mean) / std`` per feature with the training statistics (features
        never seen in training, or constant ones, are left as they are); 0 where invalid."""
        if not self.standardise_features:
            return features
        seen = self.feature_count > 1
        std = (self.feature_m2 / self.feature_count.clamp_min(1)).sqrt()
        seen &= std > 0
        mean = torch.where(seen, self.feature_mean, 0.0).float()
        std = torch.where(seen, std, 1.0).float()
        shape = (1, -1, *[1] * (features.ndim - 2))
        out = (features - mean.view(shape)) / std.view(shape)
        return torch.where(valid, out, torch.zeros((), device=features.device))

    def raw_pixel_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel features F(X) in fp32 and where they are valid, from the normalised bands.

        Args:
            x: ``(B, C, H, W)`` (or ``(B, C, T, H, W)``), NaN at invalid pixels.

        Returns:
            ``(features, valid)``, each ``(B, F, H, W)``: the raw bands (0 where invalid) then
            the indices (computed from reflectance, 0 where a band they read is invalid).
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            std, mean = self._band_stats(x)
            stored = x * std + mean
            valid = torch.isfinite(stored)  # (B, C, H, W)
            if self.nodata is not None:
                valid &= (stored - self.nodata).abs() > 1e-4 * max(1.0, abs(self.nodata))
            zero = torch.zeros((), device=x.device)
            reflectance = torch.where(valid, stored / self.reflectance_scale, zero)
            parts, masks = [], []
            if self.raw_bands:
                parts.append(torch.where(valid, x, zero))
                masks.append(valid)
            if self.indices.names:
                index_valid = self.indices.validity(valid)
                parts.append(torch.where(index_valid, self.indices(reflectance), zero))
                masks.append(index_valid)
            return torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    def feature_names(self) -> list[str]:
        """Names of the F per-pixel features, in order: the raw bands, then the indices."""
        return [*(self.bands if self.raw_bands else []), *self.indices.names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Spectral patch tokens before norm matching: ``(B, C, H, W) -> (B, N, D)``."""
        with torch.no_grad():  # the data, not the adapter, decides these: no graph to keep
            features, valid = self.raw_pixel_features(x)  # (B, F, H, W) each
            if self.standardise_features and self.training:
                self.update_feature_statistics(features, valid)
            features = self.standardise(features, valid)
            for f, value in self.occlude_features.items():
                features[:, f] = torch.where(valid[:, f], value, 0.0)
            k = self.pixels_per_patch if self.training else None
            statistics = pixel_set_statistics(
                features, self.patch_size, self.stats, valid, k, tubelet_size=self.tubelet_size
            )  # (B, N, F*S)
            for column, value in self.occlude_statistics.items():
                statistics[..., column] = value
        statistics = statistics.to(self.projection.weight.dtype)
        return self.spectral_map(self.projection(self.norm(statistics)))  # (B, N, D)

    def finish(self, tokens: torch.Tensor, x_p: torch.Tensor, num_prefix: int) -> torch.Tensor:
        """Match norms with the geometry stream, then add the spectral prefix (CLS) tokens.

        Args:
            tokens: spectral patch tokens ``(B, N, D)`` from :meth:`forward`.
            x_p: the geometry stream at the input of ``blocks[0]`` ``(B, P+N, D)``.
            num_prefix: number P of prefix tokens (CLS, registers) of the ViT.

        Returns:
            the spectral stream x̃_A ``(B, P+N, D)``: patch tokens rescaled to ‖x_P‖ per token,
            and CLS the mean of those rescaled patch tokens (or the learned token, rescaled to
            the norm of x_P's CLS).
        """
        b, n, d = tokens.shape
        if x_p.shape[1] != num_prefix + n or x_p.shape[-1] != d:
            raise RuntimeError(
                f"DEFLECT spectral stream has {n} patch tokens but the input of blocks[0] has shape "
                f"{tuple(x_p.shape)} with {num_prefix} prefix tokens; token dropping (patch_drop) "
                "and input padding are not supported"
            )
        norms = x_p.norm(dim=-1, keepdim=True).to(tokens.dtype)  # (B, P+N, 1)
        if self.norm_match:
            own = tokens.norm(dim=-1, keepdim=True).clamp_min(self.eps)
            tokens = tokens * norms[:, num_prefix:] / own  # (B, N, D)
        if not num_prefix:
            return tokens
        if self.cls_token is not None:
            cls = self.cls_token.view(1, 1, d).expand(b, num_prefix, d)
            if self.norm_match:
                cls = cls * norms[:, :num_prefix] / self.cls_token.norm().clamp_min(self.eps)
        else:
            cls = tokens.mean(dim=1, keepdim=True).expand(b, num_prefix, d)
        return torch.cat([cls, tokens], dim=1)  # (B, P+N, D)

    def extra_repr(self) -> str:
        return (
            f"bands={self.bands}, stats={self.stats}, num_features={self.num_features}, "
            f"pixels_per_patch={self.pixels_per_patch}, norm_match={self.norm_match}"
        )
