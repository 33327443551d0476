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

import torch
from torch import nn

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
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"cannot read encoder checkpoint {str(path)!r} as safetensors ({err}); the file "
                "is damaged or not a .safetensors file (a .pth renamed?). Re-download it, or give "
                "the path of the original .pth/.pt file"
            ) from err
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


#: Below this share of the encoder's tensors found in a checkpoint, loading it is an error.
DEFAULT_MIN_COVERAGE = 0.5


def _prefix_fix(dropped: list[str], own: dict[str, torch.Tensor]) -> dict[str, str]:
    """Wrapper prefixes that, stripped, would make dropped checkpoint keys match the model:
    ``{"net.": 52}`` when 52 keys ``net.<model key>`` were seen."""
    found: dict[str, int] = {}
    for key in dropped:
        parts = key.split(".")
        for i in range(1, min(len(parts), 4)):
            if ".".join(parts[i:]) in own:
                prefix = ".".join(parts[:i]) + "."
                found[prefix] = found.get(prefix, 0) + 1
                break
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def _top_prefixes(keys: list[str], limit: int = 8) -> list[str]:
    """The distinct first name components of ``keys`` (``layer1.``, ``fc.``), most frequent first."""
    counts: dict[str, int] = {}
    for key in keys:
        head = key.split(".", 1)[0] + ("." if "." in key else "")
        counts[head] = counts.get(head, 0) + 1
    return [k for k, _ in sorted(counts.items(), key=lambda kv: -kv[1])][:limit]


def load_encoder_checkpoint(
    encoder: nn.Module,
    path: str | Path,
    key_map: dict[str, str] | None = None,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
) -> dict:
    """Load a checkpoint into ``encoder.vit`` (``encoder``: a
    :class:`~deflect.encoders.base.Encoder`, which imports this module, hence the plain type).

    Keys are remapped (:func:`remap_keys`), keys the model lacks (heads, MAE decoders, mask
    tokens) are dropped, positional embeddings of another size are resampled by the encoder's
    family, and every dropped or missing key is listed in one warning (keys of parts the encoder
    prunes on purpose, such as an unused final norm, are only logged).

    The **coverage** is the share of the encoder's tensors the checkpoint supplied. Below
    ``min_coverage`` the checkpoint is refused: a file of another architecture, or the right one
    under an unknown wrapper prefix, would otherwise train on random weights unseen.

    Returns:
        A report: ``path``, ``loaded`` and ``total`` tensors, ``coverage``, ``missing`` and
        ``dropped`` keys (also kept as ``encoder.checkpoint_report`` for ``metrics.json``).

    Raises:
        ValueError: coverage below ``min_coverage`` (with the prefixes seen and the fix), or a
            tensor whose shape differs and cannot be mapped (names it and both shapes).
    """
    name = encoder.name
    state = remap_keys(read_state_dict(path), key_map)
    own = encoder.vit.state_dict()
    unused = sorted(k for k in state if k not in own and encoder.is_unused_key(k))
    dropped = sorted(k for k in state if k not in own and k not in unused)
    state = {k: v for k, v in state.items() if k in own}
    coverage = len(state) / max(len(own), 1)
    if coverage < min_coverage:
        fixes = _prefix_fix(dropped, own)
        if fixes:
            prefix, count = next(iter(fixes.items()))
            fix = (
                f"{count} checkpoint keys are model keys under the prefix {prefix!r}: strip it "
                f"with 'encoder.checkpoint_key_map={{{re.escape(prefix)}: \"\"}}' on the command "
                f"line (in a YAML file: checkpoint_key_map: {{'^{re.escape(prefix)}': ''}})"
            )
        else:
            fix = (
                "none of its keys look like this encoder's (a checkpoint of another "
                f"architecture?); check that encoder={name} is the model it was trained as, or "
                "rename its keys with encoder.checkpoint_key_map={regex: replacement}"
            )
        raise ValueError(
            f"{name}: checkpoint {str(path)!r} supplies {len(state)} of the encoder's {len(own)} "
            f"tensors ({100 * coverage:.0f}%, below encoder.checkpoint_min_coverage="
            f"{min_coverage:g}), so the encoder would run on random weights. Its keys start with "
            f"{_top_prefixes(dropped + list(state))}; the encoder's with "
            f"{_top_prefixes(list(own))}. Fix: {fix}"
        )
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
        lines = [
            f"{name}: checkpoint {str(path)!r} does not match the model exactly: it supplies "
            f"{len(state)} of the encoder's {len(own)} tensors ({100 * coverage:.1f}%)"
        ]
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
    report = {
        "path": str(Path(path).expanduser()),
        "loaded": len(state),
        "total": len(own),
        "coverage": round(coverage, 6),
        "missing": missing,
        "dropped": dropped,
    }
    encoder.checkpoint_report = report
    return report
