"""Configuration of DEFLECT (Thoreau, Marsocci & Derksen, ICCV 2025, arXiv:2503.09493).

Only the method's hyper-parameters: the data (bands, statistics, reflectance scale, sensor) come
from the :class:`~deflect.data.DataSpec` the model is built with, and the geometry stream's bands
are the encoder's ``pretrained_bands``. Every point the public sources leave open is an option
here; the defaults are this project's (``docs/method.md`` gives every equation and option, and
the spectral study behind the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deflect.tuners.config import TunerConfig
from deflect.tuners.deflect.deflection import DEFLECTION_MODES
from deflect.tuners.deflect.indices import check_index_names
from deflect.tuners.deflect.upe import statistic_quantile

DEFAULT_STATS: tuple[str, ...] = ("mean", "std", "min", "max", "q10", "q25", "q75", "q90")


@dataclass
class DeflectConfig(TunerConfig):
    """DEFLECT: untangled patch embedding (UPE), untangled attention (uAtt), embedding deflection.

    UPE:
        indices: ``"default"`` (the curated list, restricted to the indices the bands allow),
            ``"auto"`` (every computable spyndex index) or a list of spyndex names (each must be
            computable from the bands). Stored resolved to a list once the model is built.
        nir_from_b8a: B8A stands in for N (NIR) when B8 is absent (HLS, or any band set
            with the narrow NIR band only); without it NDVI, NBR, EVI, ... are left out.
        raw_bands: include the normalised bands among the per-pixel features.
        stats: pixel-set statistics per patch (``mean std min max median qNN``).
        pixels_per_patch: sample k random pixels per patch in training (None: all pixels).
        hidden_dim: hidden width of the residual bottleneck map T.
        norm_match: rescale spectral patch tokens to the norm of the geometry tokens.
        cls_token: ``mean`` (mean of the norm-matched spectral patch tokens) or ``learned``.
        index_clamp: spectral indices are clamped to ``[-index_clamp, index_clamp]``.
        standardise_features: z-score each per-pixel feature (band or index) with its mean and
            std over the training pixels (running statistics of the training batches, frozen
            in evaluation and saved with the adapter) before the pixel-set statistics.

    uAtt and deflection:
        rank: rank r of U_ℓ V_ℓ.
        target_blocks: blocks with untangled attention.
        temperature: ``sqrt_d`` (τ = 1/√d) or ``sqrt_2d`` (τ = 1/√(2d), the prototype's).
        deflection: ``hard`` (the attention update keeps the frozen update's length),
            ``embedding`` (the token after the attention keeps the frozen block's length),
            ``soft`` (a loss pulls the update's length to the frozen one's) or ``none``.
        lambda_deflection: weight of the soft-deflection loss.
        eps: floor of norms in divisions.
    """

    method: str = "deflect"
    indices: list[str] | str = "default"
    nir_from_b8a: bool = True
    raw_bands: bool = True
    stats: list[str] = field(default_factory=lambda: list(DEFAULT_STATS))
    pixels_per_patch: int | None = None
    hidden_dim: int = 8
    norm_match: bool = True
    cls_token: str = "mean"
    index_clamp: float = 10.0
    standardise_features: bool = False
    rank: int = 8
    target_blocks: list[int] = field(default_factory=lambda: [0, 1, 2])
    temperature: str = "sqrt_d"
    deflection: str = "embedding"
    lambda_deflection: float = 1.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.indices, str):
            self.indices = [str(i) for i in self.indices]
        check_index_names(self.indices)
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
