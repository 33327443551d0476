"""Joint image/mask transforms on tensors: random crop, flips, 90° rotations, normalisation.

Geometric operations act on the last two (spatial) axes of both the image (C, H, W) and the
pixel target, a class mask (H, W) or a regression target raster (T, H, W) float, with the same
random draw, so band order is never touched and targets stay aligned with pixels. Each moves
whole pixels (no interpolation), so no invalid (NaN) value is ever mixed into a valid one.
Padding marks the added pixels invalid: NaN in the image (as the sliding window pads at
evaluation), ``ignore_index`` in a mask, NaN in a target raster. Randomness comes from torch's global RNG:
seeding torch (and the data-loader's per-worker seeding) makes the augmentation reproducible.
"""

from __future__ import annotations

import torch

from deflect.data import DataSpec


class JointTransform:
    """Random crop, flips and 90° rotations of image and mask together, then normalisation.

    Called as ``image, mask = t(image, mask)`` with ``image`` (C, H, W) and ``mask`` (H, W)
    (classes) or a float target raster (T, H, W) (regression: NaN where there is no target).

    Args:
        mean: per-band mean, in the image's channel order and units.
        std: per-band standard deviation, same order (validated by
            :class:`~deflect.data.DataSpec`, see :func:`build_transform`).
        crop_size: side of the square random crop; None keeps the whole image. Images smaller
            than the crop are padded at the bottom/right with NaN (image: invalid pixels) and
            ``ignore_index`` (mask).
        hflip: probability of a horizontal flip (along the width axis).
        vflip: probability of a vertical flip (along the height axis).
        rot90: rotate by a random multiple of 90°; non-square images only by 0° or 180° so
            their shape is kept.
        ignore_index: mask value of unlabelled pixels.
        min_labelled_fraction: when > 0, redraw the crop (up to ``max_crop_tries`` times) until
            at least this fraction of its pixels is labelled; if no draw reaches it, a crop
            centred on a random labelled pixel is also tried and the best crop is kept. For
            sparse labels (MADOS) where a random crop can hold no label at all.
        max_crop_tries: random crop draws before the fallback.
    """

    def __init__(
        self,
        mean: list[float],
        std: list[float],
        crop_size: int | None = None,
        hflip: float = 0.0,
        vflip: float = 0.0,
        rot90: bool = False,
        ignore_index: int = -1,
        min_labelled_fraction: float = 0.0,
        max_crop_tries: int = 10,
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(
                f"JointTransform: mean has {len(mean)} values but std has {len(std)}; give one "
                "per band in both"
            )
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"JointTransform: crop_size={crop_size} must be >= 1 or None")
        for name, p in (("hflip", hflip), ("vflip", vflip)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"JointTransform: {name}={p} is a probability; use [0, 1]")
        if not 0.0 <= min_labelled_fraction <= 1.0:
            raise ValueError(
                f"JointTransform: min_labelled_fraction={min_labelled_fraction} must be in [0, 1]"
            )
        if max_crop_tries < 1:
            raise ValueError(f"JointTransform: max_crop_tries={max_crop_tries} must be >= 1")
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32)  # (C,)
        self.std = torch.tensor([float(s) for s in std], dtype=torch.float32)  # (C,)
        self.crop_size = crop_size
        self.hflip = float(hflip)
        self.vflip = float(vflip)
        self.rot90 = bool(rot90)
        self.ignore_index = int(ignore_index)
        self.min_labelled_fraction = float(min_labelled_fraction)
        self.max_crop_tries = int(max_crop_tries)

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if image.ndim != 3 or mask.ndim not in (2, 3) or image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(
                f"JointTransform: expected image (C, H, W) and mask (H, W) or target (T, H, W) "
                "of the same H, W; "
                f"got image {tuple(image.shape)} and mask {tuple(mask.shape)}"
            )
        if image.shape[0] != self.mean.numel():
            raise ValueError(
                f"JointTransform: image has {image.shape[0]} channels but mean/std have "
                f"{self.mean.numel()} values; the band statistics must match dataset.bands"
            )
        image = image.float()
        if self.crop_size is not None:
            image, mask = self._crop(image, mask)
        if self.hflip > 0 and torch.rand(()).item() < self.hflip:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.vflip > 0 and torch.rand(()).item() < self.vflip:
            image, mask = image.flip(-2), mask.flip(-2)
        if self.rot90:
            height, width = mask.shape[-2:]
            # A non-square image keeps its shape (and batches) only under 0° or 180°.
            choices = 4 if height == width else 2
            k = int(torch.randint(choices, ()).item()) * (4 // choices)
            image, mask = image.rot90(k, dims=(-2, -1)), mask.rot90(k, dims=(-2, -1))
        image = (image - self.mean[:, None, None]) / self.std[:, None, None]  # (C, H, W)
        return image.contiguous(), mask.contiguous()

    def _crop(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.crop_size
        assert size is not None
        height, width = mask.shape[-2:]
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        if pad_h or pad_w:
            image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=torch.nan)
            fill = torch.nan if mask.is_floating_point() else self.ignore_index
            mask = torch.nn.functional.pad(mask, (0, pad_w, 0, pad_h), value=fill)
            height, width = mask.shape[-2:]

        def window(top: int, left: int) -> tuple[torch.Tensor, torch.Tensor]:
            rows, cols = slice(top, top + size), slice(left, left + size)
            return image[:, rows, cols], mask[..., rows, cols]

        def draw() -> tuple[int, int]:
            top = int(torch.randint(height - size + 1, ()).item())
            left = int(torch.randint(width - size + 1, ()).item())
            return top, left

        if self.min_labelled_fraction <= 0:
            return window(*draw())

        best, best_fraction = (0, 0), -1.0
        for _ in range(self.max_crop_tries):
            top, left = draw()
            fraction = self._labelled_fraction(window(top, left)[1])
            if fraction >= self.min_labelled_fraction:
                return window(top, left)
            if fraction > best_fraction:
                best, best_fraction = (top, left), fraction
        labelled = self._labelled(mask).nonzero()  # (N, 2)
        if len(labelled):
            row, col = labelled[int(torch.randint(len(labelled), ()).item())].tolist()
            top = min(max(row - size // 2, 0), height - size)
            left = min(max(col - size // 2, 0), width - size)
            if self._labelled_fraction(window(top, left)[1]) > best_fraction:
                best = (top, left)
        return window(*best)

    def _labelled(self, mask: torch.Tensor) -> torch.Tensor:
        """(H, W) True where a pixel has a label: a class, or at least one finite target."""
        if mask.is_floating_point():
            finite = torch.isfinite(mask)
            return finite.any(0) if mask.ndim == 3 else finite
        return mask != self.ignore_index

    def _labelled_fraction(self, mask: torch.Tensor) -> float:
        return self._labelled(mask).float().mean().item()

    def __repr__(self) -> str:
        return (
            f"JointTransform(crop_size={self.crop_size}, hflip={self.hflip}, vflip={self.vflip}, "
            f"rot90={self.rot90}, min_labelled_fraction={self.min_labelled_fraction}, "
            f"bands={self.mean.numel()})"
        )


def build_transform(
    data: DataSpec,
    train: bool,
    crop_size: int | None,
    hflip: float = 0.0,
    vflip: float = 0.0,
    rot90: bool = False,
    min_labelled_fraction: float = 0.0,
) -> JointTransform:
    """The :class:`JointTransform` of a split, with the statistics and ignore index of ``data``.

    With ``train=False`` only normalisation remains: evaluation sees whole, unflipped images.
    """
    stats = (data.mean_list(), data.std_list())
    if not train:
        return JointTransform(*stats, ignore_index=data.ignore_index)
    return JointTransform(
        *stats,
        crop_size=crop_size,
        hflip=hflip,
        vflip=vflip,
        rot90=rot90,
        ignore_index=data.ignore_index,
        min_labelled_fraction=min_labelled_fraction,
    )


def resize_nan_aware(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(C, H, W)`` to ``(C, size, size)`` in which invalid (NaN) pixels
    take no part: each band is resized with its invalid pixels at 0 and divided by the resized
    validity weight, so a valid output pixel is the weighted mean of the valid input pixels
    around it; an output pixel with no valid input around it is NaN."""
    if image.shape[-2:] == (size, size):
        return image
    valid = torch.isfinite(image)
    values = torch.where(valid, image, torch.zeros((), dtype=image.dtype))
    both = torch.cat([values, valid.to(image.dtype)], dim=0)[None]  # (1, 2C, H, W)
    out = torch.nn.functional.interpolate(both, size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=True)[0]  # fmt: skip
    c = image.shape[0]
    total, weight = out[:c], out[c:]
    return torch.where(weight > 1e-6, total / weight.clamp_min(1e-6), torch.nan)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` pixels of ``(C, H, W)``; a smaller image is padded with
    NaN (invalid) on every side."""
    h, w = image.shape[-2:]
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if pad_h or pad_w:
        image = torch.nn.functional.pad(
            image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=torch.nan
        )
        h, w = image.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top : top + size, left : left + size]


class ImageTransform:
    """An image-level sample's transform: the image brought to ``size`` (``resize``: bilinear,
    NaN-aware; ``center_crop``), random flips and 90° rotations in training, normalisation.
    Called as ``image, label = t(image, label)``; the label passes through."""

    def __init__(self, mean: list[float], std: list[float], size: int, mode: str = "resize",
                 hflip: float = 0.0, vflip: float = 0.0, rot90: bool = False) -> None:  # fmt: skip
        if mode not in ("resize", "center_crop"):
            raise ValueError(f"ImageTransform: mode={mode!r}: use resize or center_crop")
        if size < 1:
            raise ValueError(f"ImageTransform: size={size} must be >= 1")
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32)
        self.std = torch.tensor([float(s) for s in std], dtype=torch.float32)
        self.size, self.mode = int(size), mode
        self.hflip, self.vflip, self.rot90 = float(hflip), float(vflip), bool(rot90)

    def __call__(self, image: torch.Tensor, label: torch.Tensor):
        image = image.float()
        if self.mode == "resize":
            image = resize_nan_aware(image, self.size)
        else:
            image = center_crop(image, self.size)
        if self.hflip > 0 and torch.rand(()).item() < self.hflip:
            image = image.flip(-1)
        if self.vflip > 0 and torch.rand(()).item() < self.vflip:
            image = image.flip(-2)
        if self.rot90:
            image = image.rot90(int(torch.randint(4, ()).item()), dims=(-2, -1))
        image = (image - self.mean[:, None, None]) / self.std[:, None, None]
        return image.contiguous(), label


def build_classification_transform(
    data: DataSpec, train: bool, size: int, mode: str = "resize", hflip: float = 0.0,
    vflip: float = 0.0, rot90: bool = False,
) -> ImageTransform:  # fmt: skip
    """The :class:`ImageTransform` of a split (augmentation only with ``train``)."""
    flips = {"hflip": hflip, "vflip": vflip, "rot90": rot90} if train else {}
    return ImageTransform(data.mean_list(), data.std_list(), size, mode, **flips)
