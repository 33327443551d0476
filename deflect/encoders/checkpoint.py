"""Load a pretrained encoder checkpoint from a local path, remapping its keys.

Nothing is downloaded: users point ``encoder.checkpoint`` at a file they have. Pickled files are
read with ``torch.load(weights_only=True)``, allow-listing only harmless non-tensor types that
release files hold (``argparse.Namespace``): a checkpoint from the internet never runs code.
Every key that is dropped or missing is listed in a warning, never ignored silently; a shape that
cannot be mapped is an error.

Positional embeddings are resampled per family: :func:`resample_pos_embed_2d` (a square or given
2-D grid of patches) and :func:`resample_pos_embed_3d` (tubelet ViTs: a grid per frame).
"""

from __future__ import annotations

import argparse
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deflect.encoders.base import Encoder

log = logging.getLogger(__name__)

# Wrappers that training frameworks put around a state dict (MAE, DINO, Lightning, ...).
_NESTED_KEYS = ("model", "state_dict", "teacher", "student", "model_state", "encoder")
# Prefixes that wrap the ViT's own names (DDP, DINO heads, Lightning, our own ViTEncoder, ...).
_STRIP_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
# Non-tensor types a release checkpoint may hold next to its weights, and nothing else.
SAFE_GLOBALS = [argparse.Namespace]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.pth``, ``.pt``, ``.bin`` or ``.ckpt``.

    Raises:
        FileNotFoundError: the file does not exist (names it and the config key).
        ValueError: the file cannot be read safely or holds no tensors.
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
        with torch.serialization.safe_globals(SAFE_GLOBALS):
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
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
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


def _square_side(tokens: int, what: str) -> int:
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(
            f"{what} has {tokens} patch tokens, not a square grid; its grid size cannot be "
            "inferred, so it cannot be resampled"
        )
    return side


def resample_pos_embed_2d(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resample ``(1, P + h*w, D)`` to ``(1, P + H*W, D)`` (bicubic, prefix tokens kept).

    ``old_grid`` defaults to a square grid inferred from the token count.
    """
    from timm.layers import resample_abs_pos_embed

    tokens = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = _square_side(tokens, "checkpoint pos_embed")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != tokens:
        raise ValueError(f"pos_embed has {tokens} patch tokens, not a {old_grid} grid")
    return resample_abs_pos_embed(
        pos_embed, new_size=list(new_grid), old_size=list(old_grid),
        num_prefix_tokens=num_prefix_tokens,
    )  # fmt: skip


def resample_pos_embed_3d(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int, int],
    num_prefix_tokens: int,
    old_grid: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Resample a tubelet ViT's ``(1, P + t*h*w, D)`` to ``(1, P + t*H*W, D)``, frame by frame.

    Tokens are frame-major (as ``Conv3d`` then ``flatten(2)`` orders them). The number of frames
    ``t`` must match; ``old_grid`` defaults to ``t`` square frames.

    Raises:
        ValueError: another number of frames, or a grid that cannot be inferred.
    """
    frames = new_grid[0]
    tokens = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        if tokens % frames:
            raise ValueError(
                f"checkpoint pos_embed has {tokens} patch tokens, not {frames} frames of a grid; "
                "the number of frames (num_frames / tubelet size) must match the checkpoint"
            )
        side = _square_side(tokens // frames, "a frame of the checkpoint pos_embed")
        old_grid = (frames, side, side)
    if old_grid[0] != frames:
        raise ValueError(f"pos_embed has {old_grid[0]} frames, the model {frames}")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    per_frame = grid.reshape(1, frames, old_grid[1] * old_grid[2], -1)
    resampled = [
        resample_pos_embed_2d(per_frame[:, t], new_grid[1:], 0, old_grid[1:]) for t in range(frames)
    ]
    return torch.cat([prefix, *resampled], dim=1)


def load_encoder_checkpoint(
    encoder: Encoder, path: str | Path, key_map: dict[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """Load a checkpoint into ``encoder.vit``.

    Keys are remapped (:func:`remap_keys`), keys the model lacks (heads, MAE decoders, mask
    tokens) are dropped, positional embeddings of another size are resampled by the encoder's
    family, and every dropped or missing key is listed in one warning (keys of parts the encoder
    prunes on purpose, such as an unused final norm, are only logged).

    Returns:
        ``(missing, dropped)`` keys.

    Raises:
        ValueError: a tensor whose shape differs and cannot be mapped (names it and both shapes).
    """
    name = encoder.name
    state = remap_keys(read_state_dict(path), key_map)
    own = encoder.vit.state_dict()
    unused = sorted(k for k in state if k not in own and encoder.is_unused_key(k))
    dropped = sorted(k for k in state if k not in own and k not in unused)
    state = {k: v for k, v in state.items() if k in own}
    if unused:
        log.info("%s: %d checkpoint tensors of parts the encoder does not use: %s", name,
                 len(unused), ", ".join(unused))  # fmt: skip
    for key in encoder.pos_embed_keys:
        if key in state and state[key].shape != own[key].shape:
            before = tuple(state[key].shape)
            state[key] = encoder.resample_pos_embed(key, state[key], own[key])
            log.info("%s: resampled %s from %s to %s", name, key, before, tuple(own[key].shape))
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if v.shape != own[k].shape
    ]
    if mismatched:
        raise ValueError(
            f"{name}: checkpoint {str(path)!r} has tensors of other shapes than the model: "
            + "; ".join(mismatched)
            + ". Check that the encoder config (arch, patch_size, pretrained_bands) matches the "
            "checkpoint's architecture"
        )
    result = encoder.vit.load_state_dict(state, strict=False)
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
        warnings.warn("\n".join(lines), stacklevel=3)
    else:
        log.info("%s: loaded all %d tensors from %s", name, len(state), path)
    return missing, dropped
