"""The module that is exported: a trained model behind its band handling, ready to be traced.

:class:`RawInputModel` takes the raw image as stored on disk (the run's bands in the band
manifest's order, float32, in the files' units) and does what the data pipeline does before the
model (``datasets/base.py`` ``read_sample``, :func:`deflect.data.invalid_to_nan`, the
normalisation of :mod:`datasets.transforms`): non-finite pixels and the training no-data value
become NaN, then ``(x - mean) / std`` per band with the run's statistics. The reflectance scale
lives in those statistics (they are in the files' units) and in DEFLECT's spectral indices,
which read ``stored / reflectance_scale``: both are constants of the graph.

:func:`prepare_for_export` turns a copy of the framework's model into one that traces to a graph
valid at any batch, height and width, with the same outputs:

* the fine-tuning method's adapter is merged into the weights where the method allows it
  (LoRA and scaled LoRA fold ``W + s B A`` and their scales; BitFit, norm tuning and full
  fine-tuning trained the base tensors in place; a band strategy's trained kernel is the patch
  convolution's weight). DEFLECT acts on activations: its UPE, uAtt and deflection stay in the
  graph as extra operators;
* ``nn.AdaptiveAvgPool2d`` (UperNet's pyramid pooling) becomes :class:`MatrixAdaptiveAvgPool2d`:
  the ONNX exporter writes adaptive pooling as an ``AveragePool`` whose kernel is computed from
  the traced size, so at any other size the graph silently gives other values or fails;
* UperNet's fused 3x3-of-upsampled convolution (``fast_fusion``) caches its interpolation
  matrices per size in Python; export uses the plain upsample-then-convolve path (the same
  function);
* timm ViTs take any multiple of the patch size: the learned positional embedding is resampled
  to the input's patch grid in the graph (bicubic, as timm's ``dynamic_img_size``; antialiased
  when shrinking, which ONNX ``Resize`` has since opset 18). At the trained size the resampling
  is the identity.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from deflect.data import DataSpec

log = logging.getLogger(__name__)


def adaptive_pool_matrix(length: torch.SymInt | int, bins: int, like: torch.Tensor) -> torch.Tensor:
    """``(bins, length)``: row ``i`` averages the pixels ``[floor(i L / n), ceil((i+1) L / n))``,
    PyTorch's adaptive average pooling along one axis, as a matrix built from the traced size."""
    i = torch.arange(bins, device=like.device)
    start = (i * length) // bins
    end = ((i + 1) * length + bins - 1) // bins
    j = torch.arange(length, device=like.device)
    inside = (j[None] >= start[:, None]) & (j[None] < end[:, None])  # (bins, L)
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


class MatrixAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d(bins)`` as two matrix products whose matrices follow the input's
    size, so the exported graph is right at every size (see the module docstring).

    Args:
        output_size: bins per axis (an int, or a pair).
    """

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        size = (output_size, output_size) if isinstance(output_size, int) else output_size
        self.bins = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, bins, bins)``."""
        rows = adaptive_pool_matrix(x.shape[-2], self.bins[0], x)  # (bh, H)
        cols = adaptive_pool_matrix(x.shape[-1], self.bins[1], x)  # (bw, W)
        return rows @ x @ cols.T


def replace_adaptive_pools(model: nn.Module) -> int:
    """Swap every ``nn.AdaptiveAvgPool2d`` of ``model`` for :class:`MatrixAdaptiveAvgPool2d`;
    returns how many were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.AdaptiveAvgPool2d):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, MatrixAdaptiveAvgPool2d(module.output_size))
            swapped += 1
    return swapped


def allow_any_size(model: nn.Module) -> bool:
    """Let the timm ViT inside ``model`` take any multiple of the patch size, its positional
    embedding resampled to the input's grid (timm's ``dynamic_img_size``). Returns False where
    the encoder has no such ViT (its positional embedding is then fixed to the trained size)."""
    from timm.layers import Format, PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    changed = False
    for vit in model.modules():
        if not isinstance(vit, VisionTransformer) or vit.pos_embed is None:
            continue
        embeds = [m for m in vit.modules() if isinstance(m, PatchEmbed)]
        if len(embeds) != 1 or not embeds[0].flatten:
            continue
        embed = embeds[0]
        embed.strict_img_size = False
        embed.flatten, embed.output_fmt = False, Format.NHWC
        vit.dynamic_img_size = True
        changed = True
    return changed


def merge_adapters(model: nn.Module) -> str:
    """Merge the encoder's fine-tuning method into the weights where it allows; returns what
    was done, for the metadata and the report."""
    encoder = getattr(model, "encoder", None)
    tuner = getattr(encoder, "tuner", None)
    if tuner is None:
        return "no adapter"
    name = encoder.active_adapter
    method = tuner.configs[name].method if name in tuner.configs else "none"
    if tuner.has_added_modules(name) and not tuner.mergeable:
        return f"{method}: acts on activations; its modules stay in the graph as extra operators"
    kernel = any(".bands_kernel." in n for n in encoder.state_dict())
    with torch.no_grad():
        if tuner.mergeable:
            encoder.merge_adapter()
            how = "low-rank update folded into the frozen weights"
        else:
            how = "trained tensors are the model's own weights"
    if kernel:
        how += "; the trained all-band kernel is the patch convolution's weight"
    return f"{method}: merged ({how})"


def forget_last_forward(model: nn.Module) -> None:
    """Drop what the last forward left in the model (DEFLECT's spectral stream and its
    soft-deflection losses, which hold autograd history and cannot be deep-copied)."""
    for module in model.modules():
        state = getattr(module, "state", None)
        if callable(getattr(state, "reset", None)):
            state.reset()


def copy_for_export(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode (after :func:`forget_last_forward`)."""
    forget_last_forward(model)
    return copy.deepcopy(model).eval()


def prepare_for_export(model: nn.Module) -> tuple[nn.Module, dict[str, object]]:
    """A copy of ``model`` that traces to a graph valid at any batch and size (see the module
    docstring); ``model`` itself is untouched.

    Returns:
        The prepared copy (eval mode) and what was changed: ``merged`` (text),
        ``any_size`` (whether height and width are free), ``pools`` (pools swapped).
    """
    prepared = copy_for_export(model)
    merged = merge_adapters(prepared)
    head = getattr(prepared, "decode_head", None)
    if head is not None and getattr(head, "fast_fusion", False):
        head.fast_fusion = False
    pools = replace_adaptive_pools(prepared)
    any_size = allow_any_size(prepared)
    return prepared, {"merged": merged, "any_size": any_size, "pools": pools}


class RawInputModel(nn.Module):
    """Raw image as stored on disk -> the task's outputs: what the ONNX file computes.

    Args:
        model: the (prepared) segmentor or image classifier; takes normalised input.
        spec: the run's band manifest (bands, statistics, no-data value).
        task: ``segmentation`` (output: class logits at the input's size) or
            ``classification`` (outputs: probabilities, and the logits).
        multi_label: classification with a sigmoid per label instead of a softmax.
        gsd: a constant ground sample distance for encoders that take one (Scale-MAE), as
            ``predict.py`` gives it; None for the others.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: DataSpec,
        task: str = "segmentation",
        multi_label: bool = False,
        gsd: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.multi_label = multi_label
        self.nodata = None if spec.nodata is None else float(spec.nodata)
        shape = (1, spec.num_bands, 1, 1)
        self.register_buffer("mean", torch.tensor(spec.mean_list()).view(shape))
        self.register_buffer("std", torch.tensor(spec.std_list()).view(shape))
        self.gsd = gsd

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` raw -> NaN at invalid pixels (non-finite, no-data), then
        ``(x - mean) / std`` per band: the model's input."""
        invalid = ~torch.isfinite(raw)
        if self.nodata is not None:
            invalid = invalid | (raw == self.nodata)
        x = torch.where(invalid, torch.full_like(raw, float("nan")), raw)
        return (x - self.mean) / self.std

    def forward(self, raw: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Segmentation: logits ``(B, K, H, W)``; classification: probabilities and logits,
        ``(B, K)`` each."""
        x = self.normalise(raw.float())
        metadata = {}
        if self.gsd is not None:
            metadata["gsd"] = torch.full((x.shape[0],), self.gsd, dtype=x.dtype, device=x.device)
        out = self.model(x, **metadata)
        if self.task != "classification":
            return out
        probabilities = torch.sigmoid(out) if self.multi_label else torch.softmax(out, dim=1)
        return probabilities, out
