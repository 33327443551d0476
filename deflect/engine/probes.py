"""What :mod:`deflect.engine.explain` measures on a trained model: occlusions (a band, or one of
DEFLECT's UPE features or statistic groups, replaced by its training mean) and the deflection
of each adapted block (recorded on the model's own forward passes)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Occlusion:
    """One input replaced by its training mean: a band, a UPE feature, or a statistic group."""

    kind: str  # band | feature | statistic
    name: str
    index: int


class BandOcclusion(nn.Module):
    """``model`` fed its input with band ``index`` at the training mean (0 after
    normalisation) wherever it is valid; invalid (NaN) pixels stay invalid."""

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.model, self.index = model, index
        self.metadata_keys = getattr(model, "metadata_keys", ())

    def forward(self, x: torch.Tensor, **metadata: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        band = x[:, self.index]
        x[:, self.index] = torch.where(torch.isnan(band), band, torch.zeros_like(band))
        return self.model(x, **metadata)


def _vit(model: nn.Module) -> nn.Module:
    """The adapted ViT (``blocks``, ``patch_embed``) of a segmentor or of a DEFLECT model."""
    encoder = getattr(model, "encoder", None)
    if encoder is not None:  # a segmentor: its framework encoder's ViT
        return encoder.base_model.vit
    base = model.base_model  # a DeflectModel around an encoder or a bare timm ViT
    return base.vit if hasattr(base, "vit") else base


def deflect_upe(model: nn.Module):
    """The active adapter's untangled patch embedding of a segmentor, or None (not DEFLECT)."""
    patch_embed = getattr(_vit(model), "patch_embed", None)
    upes = getattr(patch_embed, "deflect_upe", None)
    if not upes:
        return None
    return upes[patch_embed.active_adapter]


@contextmanager
def occluded(model: nn.Module, occlusion: Occlusion, means: dict):
    """``model`` (or a wrapper) with ``occlusion`` applied, restored afterwards."""
    if occlusion.kind == "band":
        yield BandOcclusion(model, occlusion.index)
        return
    upe = deflect_upe(model)
    if occlusion.kind == "feature":
        upe.occlude_features = {occlusion.index: float(means["features"][occlusion.index])}
    else:
        s, num_stats = occlusion.index, len(upe.stats)
        columns = range(s, upe.num_features * num_stats, num_stats)
        upe.occlude_statistics = {c: float(means["statistics"][c]) for c in columns}
    try:
        yield model
    finally:
        upe.occlude_features, upe.occlude_statistics = {}, {}


@torch.no_grad()
def upe_training_means(model: nn.Module, dataset, samples: int = 64) -> dict:
    """Means over (up to ``samples``) training samples of UPE's per-pixel features (over their
    valid pixels) and of its F·S pixel-set statistics (over patch tokens)."""
    from deflect.tuners.deflect.upe import pixel_set_statistics

    upe = deflect_upe(model)
    device = next(model.parameters()).device
    sums = torch.zeros(upe.num_features, dtype=torch.float64)
    counts = torch.zeros(upe.num_features, dtype=torch.float64)
    stat_sum, stat_count = None, 0
    picks = sorted({round(i * (len(dataset) - 1) / max(samples - 1, 1)) for i in range(samples)})
    for i in picks[: len(dataset)]:
        x = dataset[i]["image"][None].to(device)
        features, valid = upe.pixel_features(x)  # (1, F, H, W)
        sums += torch.where(valid, features, 0.0).sum(dim=(0, 2, 3)).double().cpu()
        counts += valid.sum(dim=(0, 2, 3)).double().cpu()
        stats = pixel_set_statistics(features, upe.patch_size, upe.stats, valid,
                                     tubelet_size=upe.tubelet_size)  # fmt: skip  # (1, N, F*S)
        flat = stats.reshape(-1, stats.shape[-1]).double().cpu()
        stat_sum = flat.sum(0) if stat_sum is None else stat_sum + flat.sum(0)
        stat_count += flat.shape[0]
    return {
        "features": (sums / counts.clamp_min(1)).tolist(),
        "statistics": (stat_sum / max(stat_count, 1)).tolist(),
    }


def occlusions(model: nn.Module, bands: list[str]) -> list[Occlusion]:
    """Every input of ``model`` to occlude: its bands, and DEFLECT's features and statistics."""
    out = [Occlusion("band", b, i) for i, b in enumerate(bands)]
    upe = deflect_upe(model)
    if upe is not None:
        out += [Occlusion("feature", n, i) for i, n in enumerate(upe.feature_names())]
        out += [Occlusion("statistic", n, i) for i, n in enumerate(upe.stats)]
    return out


# ---- the deflection ------------------------------------------------------------------------------
def attention_logit_share(
    attn: nn.Module, u: torch.Tensor, spectral_qkv: torch.Tensor, num_prefix: int
) -> torch.Tensor:
    """Per sample, the share of the untangled attention logits that the spectral stream makes,
    over patch-token queries: Σ|Q_P K_Aᵀ + Q_A K_Pᵀ + Q_A K_Aᵀ| / (Σ|Q_P K_Pᵀ| + that). ``(B,)``"""
    from deflect.tuners.deflect.uatt import _heads

    q_p, k_p, _ = _heads(attn.qkv(u), attn.num_heads)  # (B, h, T, d)
    q_a, k_a, _ = _heads(spectral_qkv, attn.num_heads)
    rgb = q_p @ k_p.transpose(-1, -2)
    spectral = (
        q_p @ k_a.transpose(-1, -2) + q_a @ k_p.transpose(-1, -2) + q_a @ k_a.transpose(-1, -2)
    )
    rgb, spectral = rgb[:, :, num_prefix:].abs(), spectral[:, :, num_prefix:].abs()
    s = spectral.sum(dim=(1, 2, 3))
    return s / (rgb.sum(dim=(1, 2, 3)) + s).clamp_min(1e-12)


class DeflectionRecorder:
    """Records, per adapted block, the statistics of section "Deflection" above while a DEFLECT
    model runs (patching the adapter's functions for the duration of a ``with``)."""

    def __init__(self, model: nn.Module) -> None:
        vit = _vit(model)
        self.blocks = [i for i, b in enumerate(vit.blocks) if getattr(b, "deflect_uatt", None)]
        self.num_prefix = int(getattr(vit, "num_prefix_tokens", 1))
        self.records: dict[int, dict[str, list[torch.Tensor]]] = {
            b: {"angle": [], "ratio": [], "added": [], "share": []} for b in self.blocks
        }
        self._calls = 0

    def __enter__(self) -> DeflectionRecorder:
        from deflect.tuners.deflect import layer

        self._layer = layer
        self._originals = (layer.untangled_attention, layer.deflect_update,
                           layer.deflect_embedding)  # fmt: skip
        attend, update, embed = self._originals
        state: dict = {}

        def untangled(attn, u, spectral_qkv, *args, **kwargs):
            block = self.blocks[self._calls % len(self.blocks)]
            self._calls += 1
            delta_uatt, delta_rgb = attend(attn, u, spectral_qkv, *args, **kwargs)
            rec = self.records[block]
            p = self.num_prefix
            cos = torch.nn.functional.cosine_similarity(delta_uatt[:, p:], delta_rgb[:, p:], dim=-1)
            rec["angle"].append(torch.rad2deg(torch.acos(cos.clamp(-1, 1))).flatten().cpu())
            ratio = delta_uatt[:, p:].norm(dim=-1) / delta_rgb[:, p:].norm(dim=-1).clamp_min(1e-12)
            rec["ratio"].append(ratio.flatten().cpu())
            rec["share"].append(attention_logit_share(attn, u, spectral_qkv, p).cpu())
            state["block"], state["x"] = block, None
            return delta_uatt, delta_rgb

        def deflect(delta_uatt, delta_rgb, mode="hard", eps=1e-6):
            out = update(delta_uatt, delta_rgb, mode, eps)
            state["added"] = out
            return out

        def deflect_token(x, delta_uatt, delta_rgb, eps=1e-6):
            out = embed(x, delta_uatt, delta_rgb, eps)
            state["added"], state["x"] = out, x
            return out

        self._state = state
        layer.untangled_attention, layer.deflect_update = untangled, deflect
        layer.deflect_embedding = deflect_token
        return self

    def block_input(self, block: int, x: torch.Tensor, added: torch.Tensor) -> None:
        """Record the added update relative to the token entering ``block``."""
        p = self.num_prefix
        rel = added[:, p:].norm(dim=-1) / x[:, p:].norm(dim=-1).clamp_min(1e-12)
        self.records[block]["added"].append(rel.flatten().cpu())

    def __exit__(self, *exc) -> None:
        (self._layer.untangled_attention, self._layer.deflect_update,
         self._layer.deflect_embedding) = self._originals  # fmt: skip

    def summary(self) -> list[dict]:
        """Per block: quantiles (10, 50, 90 %) of angle, norm ratio, added/‖x‖; mean share."""
        out = []
        for block in self.blocks:
            rec = {k: torch.cat(v).double() for k, v in self.records[block].items() if v}
            row: dict = {"block": block}
            for key in ("angle", "ratio", "added"):
                if key in rec:
                    q = torch.quantile(rec[key], torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
                    row[key] = [float(v) for v in q]
            row["share"] = float(rec["share"].mean()) if "share" in rec else math.nan
            row["angles"] = rec["angle"].float().tolist()[:20000] if "angle" in rec else []
            out.append(row)
        return out


def record_block_inputs(model: nn.Module, recorder: DeflectionRecorder) -> list:
    """Forward hooks on the adapted blocks: the added update over the token entering it."""
    blocks = _vit(model).blocks
    hooks = []
    for index in recorder.blocks:

        def hook(module, args, output, index=index):
            x = args[0]
            added = recorder._state.get("added")
            if added is not None:
                recorder.block_input(index, x, added)

        hooks.append(blocks[index].register_forward_hook(hook))
    return hooks
