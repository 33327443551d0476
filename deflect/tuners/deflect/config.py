"""Configuration of DEFLECT (Thoreau, Marsocci & Derksen, ICCV 2025, arXiv:2503.09493).

Every point the public sources leave open is an option here; the defaults are this project's
(see ``/work/shared/docs/deflect_method.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from deflect.tuners.config import TunerConfig
from deflect.tuners.deflect.deflection import DEFLECTION_MODES
from deflect.tuners.deflect.indices import DEFAULT_INDICES, canonical_band, resolve_indices
from deflect.tuners.deflect.upe import statistic_quantile

DEFAULT_STATS: tuple[str, ...] = ("mean", "std", "min", "max", "q10", "q25", "q75", "q90")


@dataclass
class DeflectConfig(TunerConfig):
    """DEFLECT: untangled patch embedding (UPE), untangled attention (uAtt), embedding deflection.

    Data:
        bands: channel names of the input (the dataset's bands, in order).
        rgb_bands: bands of the pretrained patch embedding, in its pretraining order.
        band_mean, band_std: per-band mean/std (keyed by band name) of the data pipeline's
            normalisation ``(x - mean) / std``; None when the data is not normalised.
        reflectance_scale: stored value of reflectance 1 (1 for MADOS/HLS, 10000 for L1C/L2A DN).
        nir_from_b8a: B8A stands in for N (NIR) when B8 is absent (HLS).
        sensor: spyndex sensor for the band table and wavelengths.

    UPE:
        indices: spyndex index names, or ``"auto"`` (see :func:`resolve_indices`).
        raw_bands: include the normalised bands among the per-pixel features.
        stats: pixel-set statistics per patch (``mean std min max median qNN``).
        pixels_per_patch: sample k random pixels per patch in training (None: all pixels).
        hidden_dim: hidden width of the residual bottleneck map T.
        norm_match: rescale spectral tokens to the norm of the geometry tokens.
        cls_token: ``mean`` (mean of spectral patch tokens) or ``learned``.
        index_clamp: spectral indices are clamped to ``[-index_clamp, index_clamp]``.

    uAtt and deflection:
        rank: rank r of U_ℓ V_ℓ.
        target_blocks: blocks with untangled attention.
        temperature: ``sqrt_d`` (τ = 1/√d) or ``sqrt_2d`` (τ = 1/√(2d), the prototype's).
        deflection: ``hard``, ``soft`` or ``none``.
        lambda_deflection: weight of the soft-deflection loss.
        eps: floor of norms in divisions.
    """

    method: str = "deflect"
    bands: list[str] = field(default_factory=list)
    rgb_bands: list[str] = field(default_factory=lambda: ["B4", "B3", "B2"])
    band_mean: dict[str, float] | None = None
    band_std: dict[str, float] | None = None
    reflectance_scale: float = 1.0
    nir_from_b8a: bool = False
    sensor: str = "sentinel2a"
    indices: list[str] | str = field(default_factory=lambda: list(DEFAULT_INDICES))
    raw_bands: bool = True
    stats: list[str] = field(default_factory=lambda: list(DEFAULT_STATS))
    pixels_per_patch: int | None = None
    hidden_dim: int = 8
    norm_match: bool = True
    cls_token: str = "mean"
    index_clamp: float = 10.0
    rank: int = 8
    target_blocks: list[int] = field(default_factory=lambda: [0, 1, 2])
    temperature: str = "sqrt_d"
    deflection: str = "hard"
    lambda_deflection: float = 1.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bands = [str(b) for b in self.bands]
        self.rgb_bands = [str(b) for b in self.rgb_bands]
        if not self.bands:
            raise ValueError("DeflectConfig.bands is empty; set it to the dataset's band names")
        canon = [canonical_band(b) for b in self.bands]
        if len(set(canon)) != len(canon):
            raise ValueError(f"DeflectConfig.bands {self.bands} repeat a band")
        missing_rgb = [b for b in self.rgb_bands if b not in self.bands]
        if missing_rgb:
            raise ValueError(
                f"dataset bands {self.bands} lack {missing_rgb} needed for the RGB stream; "
                "set rgb_bands to bands present in the data"
            )
        self._check_band_stats()
        if not (self.reflectance_scale > 0 and math.isfinite(self.reflectance_scale)):
            raise ValueError(f"reflectance_scale must be > 0, got {self.reflectance_scale}")
        if not isinstance(self.indices, str):
            self.indices = [str(i) for i in self.indices]
        resolve_indices(self.indices, self.bands, self.sensor, self.nir_from_b8a)
        self.stats = [str(s) for s in self.stats]
        if not self.stats or len(set(self.stats)) != len(self.stats):
            raise ValueError(f"stats must be a non-empty list without repeats, got {self.stats}")
        for s in self.stats:
            statistic_quantile(s)
        if self.pixels_per_patch is not None and self.pixels_per_patch < 1:
            raise ValueError(f"pixels_per_patch must be >= 1 or null, got {self.pixels_per_patch}")
        for name in ("hidden_dim", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cls_token not in ("mean", "learned"):
            raise ValueError(f"cls_token must be 'mean' or 'learned', got {self.cls_token!r}")
        if not self.index_clamp > 0:
            raise ValueError(f"index_clamp must be > 0, got {self.index_clamp}")
        self.target_blocks = [int(b) for b in self.target_blocks]
        if not self.target_blocks or len(set(self.target_blocks)) != len(self.target_blocks):
            raise ValueError(f"target_blocks must be non-empty, no repeats: {self.target_blocks}")
        if min(self.target_blocks) < 0:
            raise ValueError(f"target_blocks must be >= 0, got {self.target_blocks}")
        if self.temperature not in ("sqrt_d", "sqrt_2d"):
            raise ValueError(f"temperature must be 'sqrt_d' or 'sqrt_2d', got {self.temperature!r}")
        if self.deflection not in DEFLECTION_MODES:
            raise ValueError(
                f"unknown deflection mode {self.deflection!r}; use one of {list(DEFLECTION_MODES)}"
            )
        if self.lambda_deflection < 0:
            raise ValueError(f"lambda_deflection must be >= 0, got {self.lambda_deflection}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")

    def _check_band_stats(self) -> None:
        if (self.band_mean is None) != (self.band_std is None):
            raise ValueError("give both band_mean and band_std, or neither (data not normalised)")
        if self.band_mean is None:
            return
        self.band_mean = {str(k): float(v) for k, v in dict(self.band_mean).items()}
        self.band_std = {str(k): float(v) for k, v in dict(self.band_std).items()}
        for what, stats in (("band_mean", self.band_mean), ("band_std", self.band_std)):
            missing = [b for b in self.bands if b not in stats]
            if missing:
                raise ValueError(f"{what} lacks bands {missing}; give a value for every band")
        bad = {b: s for b, s in self.band_std.items() if b in self.bands and not s > 0}
        if bad:
            raise ValueError(f"band_std must be > 0, got {bad}")

    def resolved_indices(self) -> list[str]:
        """The index names (``auto`` expanded)."""
        return resolve_indices(self.indices, self.bands, self.sensor, self.nir_from_b8a)
