"""Activation checkpointing of transformer blocks: store each block's input, recompute its
activations during the backward pass.

A block is switched by giving it a subclass of its own class whose ``forward`` runs the original
one under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant, RNG state preserved, so
dropout and drop-path draw the same masks in the recomputation). The module tree, parameter names
and state-dict keys stay as they were, so tuners, optimiser groups and checkpoints see no
difference; only memory and time change. Without gradients (evaluation, ``torch.no_grad``) the
block runs once, as before.

Adapter wrappers that keep per-forward state outside the block (DEFLECT's target blocks read the
spectral stream) cannot be recomputed as a whole; they implement
``set_activation_checkpointing(enable)`` themselves and checkpoint only their pure part.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_SUBCLASSES: dict[type, type] = {}


def _checkpointed_forward(self, *args, **kwargs):
    forward = super(type(self), self).forward
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _subclass(cls: type) -> type:
    """``Checkpointed<cls>``: ``cls`` with its forward run under activation checkpointing."""
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(
            f"Checkpointed{cls.__name__}",
            (cls,),
            {
                "forward": _checkpointed_forward,
                "checkpoint_activations": True,
                "__module__": cls.__module__,
            },
        )
    return _SUBCLASSES[cls]


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``module`` recomputes its activations in the backward pass."""
    return bool(getattr(module, "checkpoint_activations", False))


def set_block_checkpointing(block: nn.Module, enable: bool) -> None:
    """Switch activation checkpointing of one block on or off (in place)."""
    own = getattr(type(block), "set_activation_checkpointing", None)
    if own is not None:  # an adapter wrapper that knows which part of it is pure
        own(block, enable)
        return
    cls = type(block)
    if enable and cls not in _SUBCLASSES.values():
        block.__class__ = _subclass(cls)
    elif not enable and cls in _SUBCLASSES.values():
        block.__class__ = cls.__mro__[1]


def set_blocks_checkpointing(blocks: Iterable[nn.Module], enable: bool) -> None:
    """:func:`set_block_checkpointing` for each of ``blocks`` (a ViT's ``blocks``)."""
    for block in blocks:
        set_block_checkpointing(block, enable)
