"""Load a pretrained encoder checkpoint from a local path, remapping its keys.

Nothing is downloaded: users point ``encoder.checkpoint`` at a file they have. Every key that is
dropped or missing is listed in a warning, never ignored silently.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Wrappers that training frameworks put around a state dict (MAE, DINO, Lightning, ...).
_NESTED_KEYS = ("model", "state_dict", "teacher", "student", "model_state", "encoder")
# Prefixes that wrap the ViT's own names (DDP, DINO heads, our own ViTEncoder, ...).
_STRIP_PREFIXES = ("module.", "backbone.", "encoder.", "model.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.pth``, ``.pt``, ``.bin`` or ``.ckpt``.

    Pickled files are read with ``weights_only=True``: no code in a checkpoint ever runs.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"encoder checkpoint {str(path)!r} does not exist; set encoder.checkpoint to the local "
            "path of the pretrained weights, or to null to run on random weights"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the path and the fix
        raise ValueError(
            f"cannot read encoder checkpoint {str(path)!r} with torch.load(weights_only=True): "
            f"{err}. Re-save it as a plain state dict or as .safetensors"
        ) from err
    for _ in range(3):  # unwrap up to three levels of nesting
        if not isinstance(obj, dict):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _NESTED_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"encoder checkpoint {str(path)!r} holds no state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def remap_keys(
    state: dict[str, torch.Tensor], key_map: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes, then apply ``key_map`` (regex pattern -> replacement) in order."""
    out = {}
    for key, value in state.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        for pattern, repl in (key_map or {}).items():
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def load_vit_checkpoint(
    model: nn.Module, path: str | Path, key_map: dict[str, str] | None = None, name: str = "encoder"
) -> tuple[list[str], list[str]]:
    """Load a pretrained checkpoint into a timm ``VisionTransformer``.

    Resamples the positional embedding when the checkpoint's patch grid differs from the
    model's. Returns ``(missing, unexpected)`` keys, both also listed in a warning.
    """
    from timm.layers import resample_abs_pos_embed

    state = remap_keys(read_state_dict(path), key_map)
    own = model.state_dict()
    # Classification heads and decoders of MAE-style checkpoints are not part of the encoder.
    dropped = [k for k in state if k not in own]
    state = {k: v for k, v in state.items() if k in own}
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        num_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        old_tokens = state["pos_embed"].shape[1] - num_prefix
        old_side = int(round(old_tokens**0.5))
        if old_side * old_side != old_tokens:
            raise ValueError(
                f"{name}: checkpoint pos_embed has {old_tokens} patch tokens, not a square grid"
            )
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"],
            new_size=model.patch_embed.grid_size,
            old_size=(old_side, old_side),
            num_prefix_tokens=num_prefix,
        )
        log.info(
            "%s: resampled pos_embed from %dx%d to %s",
            name,
            old_side,
            old_side,
            tuple(model.patch_embed.grid_size),
        )
    mismatched = [k for k, v in state.items() if v.shape != own[k].shape]
    for k in mismatched:
        dropped.append(f"{k} (shape {tuple(state[k].shape)} != {tuple(own[k].shape)})")
        del state[k]
    result = model.load_state_dict(state, strict=False)
    missing = list(result.missing_keys)
    if dropped or missing:
        lines = [f"{name}: checkpoint {str(path)!r} does not match the model exactly"]
        if dropped:
            lines.append(f"  dropped {len(dropped)} checkpoint keys: " + ", ".join(dropped))
        if missing:
            lines.append(
                f"  {len(missing)} model keys missing from the checkpoint (left at random init): "
                + ", ".join(missing)
            )
        lines.append("  fix: add regex rules to encoder.checkpoint_key_map if names differ")
        warnings.warn("\n".join(lines), stacklevel=2)
    else:
        log.info("%s: loaded all %d tensors from %s", name, len(state), path)
    return missing, dropped
