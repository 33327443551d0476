"""Checkpoints written atomically and read with ``torch.load(weights_only=True)``.

A training checkpoint holds only what is not frozen: trainable parameters, buffers (BatchNorm
statistics) and the training state. Frozen encoder weights come from the encoder checkpoint (or
the seeded random init) at build time; a fingerprint of them is stored and checked on load, so a
checkpoint is never silently combined with other frozen weights. The band manifest (the
:class:`~deflect.data.DataSpec` it was trained on) is stored too, and a model built for other
bands or statistics is refused by name.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deflect.data import DataSpec
from deflect.io import atomic_path


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, synced, then renamed over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def frozen_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that do not train."""
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without its frozen parameters, copied off the live tensors."""
    frozen = frozen_parameter_names(model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in frozen}


def frozen_fingerprint(model: nn.Module) -> torch.Tensor:
    """A float64 vector summarising the frozen weights (sum and sum of squares of each)."""
    stats = [
        torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
        for n, p in sorted(model.named_parameters())
        if not p.requires_grad
    ]
    return torch.stack(stats).flatten().cpu() if stats else torch.zeros(0, dtype=torch.float64)


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a trainable-only state dict; every missing key must be a frozen parameter."""
    result = model.load_state_dict(state, strict=False)
    frozen = frozen_parameter_names(model)
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {source} does not fit the model built from this config: "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, unexpected "
            f"{result.unexpected_keys[:10]}. Was it trained with another encoder, finetune or "
            "dataset? Evaluate it with the config saved next to it"
        )


def check_fingerprint(model: nn.Module, saved: torch.Tensor, source: str) -> None:
    """Refuse a checkpoint whose frozen weights differ from those the model was built with."""
    current = frozen_fingerprint(model)
    if current.shape != saved.shape or not torch.allclose(current, saved, rtol=1e-6, atol=1e-6):
        raise RuntimeError(
            f"the frozen encoder weights differ from those checkpoint {source} was trained with. "
            "Use the same encoder.checkpoint and seed as the training run"
        )


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states in types ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]) if len(rest) == 2 else state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no pickled code runs), naming the file on error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the path
        raise RuntimeError(f"cannot read checkpoint {str(path)!r}: {err}") from err


def check_manifest(model: nn.Module, saved: str, source: str) -> None:
    """Refuse a checkpoint trained on other bands, statistics, scale, no-data value, sensor or
    classes than ``model``'s data description (``saved``: the checkpoint's JSON band manifest;
    empty to skip). Classes count here and not for an adapter: a checkpoint holds the head,
    whose outputs are the trained classes in their order."""
    data = getattr(model, "data", None)
    if not saved or data is None:
        return
    trained = DataSpec.from_dict(json.loads(saved))
    differences = trained.differences(data)
    if trained.classes and list(trained.classes) != list(data.classes):
        differences.append(f"classes {list(trained.classes)} != {list(data.classes)}")
    if trained.targets and list(trained.targets) != list(data.targets):
        differences.append(f"targets {list(trained.targets)} != {list(data.targets)}")
    if differences:
        raise RuntimeError(
            f"checkpoint {source} was trained on other input data than this model takes: "
            + "; ".join(differences)
            + ". Use the dataset config (bands, band_stats, reflectance_scale, nodata, sensor, "
            "classes) of the training run"
        )


def load_model_state(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """Check a training checkpoint's frozen-weight fingerprint and band manifest against
    ``model``, then load its trainable state."""
    check_fingerprint(model, state["frozen_fingerprint"], source)
    check_manifest(model, state.get("data", ""), source)
    load_trainable_state(model, state["model"], source)
