"""DEFLECT (Thoreau, Marsocci & Derksen, ICCV 2025, arXiv:2503.09493): UPE, uAtt, deflection."""

from deflect.tuners.deflect.config import DeflectConfig
from deflect.tuners.deflect.deflection import deflect_update, deflection_loss
from deflect.tuners.deflect.indices import DEFAULT_INDICES, SpectralIndices, resolve_indices
from deflect.tuners.deflect.layer import DeflectBlock, DeflectPatchEmbed, SpectralStreamState
from deflect.tuners.deflect.model import DeflectTuner
from deflect.tuners.deflect.uatt import UntangledAttention, untangled_attention
from deflect.tuners.deflect.upe import UntangledPatchEmbedding, pixel_set_statistics

__all__ = [
    "DEFAULT_INDICES",
    "DeflectBlock",
    "DeflectConfig",
    "DeflectPatchEmbed",
    "DeflectTuner",
    "SpectralIndices",
    "SpectralStreamState",
    "UntangledAttention",
    "UntangledPatchEmbedding",
    "deflect_update",
    "deflection_loss",
    "pixel_set_statistics",
    "resolve_indices",
    "untangled_attention",
]
