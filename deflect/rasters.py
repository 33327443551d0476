"""Rules about raster data that training, evaluation and prediction share, each written once.

* :func:`seeded_split`: which items of a folder go to train, val and test;
* :func:`reflectance_factors`: per-band factors from one reflectance scale to another;
* :func:`band_medians` and :func:`implausible_reflectance`: whether values read at a given
  reflectance scale are plausible surface reflectance;
* the no-data validity rule (:func:`deflect.data.valid_pixels`, :func:`deflect.data.invalid_to_nan`)
  and band-name resolution (:func:`deflect.data.band_code`) live in :mod:`deflect.data`, beside
  the data description they serve, and are re-exported here.

A bottom-layer module: it imports nothing from ``deflect.engine``, ``deflect.tasks`` or
``datasets``, so each of them may import it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from deflect.data import band_code, invalid_to_nan, reflectance_bands, valid_pixels

__all__ = [
    "band_code",
    "band_medians",
    "implausible_reflectance",
    "invalid_to_nan",
    "reflectance_factors",
    "seeded_split",
    "split_sizes",
    "valid_pixels",
]

T = TypeVar("T")

# ---------------------------------------------------------------------------------- the split


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """``(n_val, n_test)`` of a seeded split of ``n`` items, the one rounding rule: each
    fraction of ``n`` rounded to the nearest integer (Python's ``round``, halves to even), and
    at least 1 for a fraction above 0 while training keeps an item (``n`` above the number of
    non-zero fractions). A split asked for is then never empty: an empty split used to fail
    later, far from its cause (``dataset=folder``), while HLS Burn Scars already kept one."""
    asked = (val_fraction > 0) + (test_fraction > 0)

    def size(fraction: float) -> int:
        if fraction <= 0:
            return 0
        return max(1, round(fraction * n)) if n > asked else round(fraction * n)

    return size(val_fraction), size(test_fraction)


def seeded_split(items: Sequence[T], split: str, val_fraction: float, test_fraction: float,
                 seed: int, strata: Sequence[str] | None = None) -> list[T]:  # fmt: skip
    """The items of ``split`` in a seeded split of ``items`` (the same on every run and machine):
    a permutation by ``seed`` (numpy's ``default_rng``), its first ``n_test`` for test, the next
    ``n_val`` for val, the rest for train, each in the original order; the sizes are
    :func:`split_sizes`. Used by ``dataset=folder``, ``chips`` and HLS Burn Scars' val split.

    With ``strata`` (each item's class, single-label chips) the split is stratified: each class
    is permuted on its own (classes in sorted order, one generator) and the classes are
    interleaved by relative position (item ``j`` of a class of ``n`` at ``(j + 0.5) / n``), so
    every split holds each class in proportion to its size (as far as rounding allows) and the
    splits' sizes are those of the unstratified split.

    Raises:
        ValueError: fractions outside [0, 1) or summing to 1 or more; strata of another length.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be fractions "
            "in [0, 1) summing to less than 1"
        )
    rng = np.random.default_rng(seed)
    if strata is None:
        order = rng.permutation(len(items))
    else:
        if len(strata) != len(items):
            raise ValueError(f"seeded_split: {len(strata)} strata for {len(items)} items")
        keyed = []
        for rank, stratum in enumerate(sorted(set(strata))):
            members = [i for i, s in enumerate(strata) if s == stratum]
            for j, k in enumerate(rng.permutation(len(members))):
                keyed.append(((j + 0.5) / len(members), rank, members[k]))
        order = np.array([i for *_, i in sorted(keyed)], dtype=np.int64)
    n_val, n_test = split_sizes(len(items), val_fraction, test_fraction)
    chosen = {"test": order[:n_test], "val": order[n_test : n_test + n_val],
              "train": order[n_test + n_val :]}[split]  # fmt: skip
    return [items[i] for i in sorted(chosen)]


# -------------------------------------------------------------------------- reflectance scale


def reflectance_factors(bands: Sequence[str], sensor: str, from_scale: float,
                        to_scale: float) -> np.ndarray | None:  # fmt: skip
    """Per-band factors ``(C, 1, 1)`` that turn values stored at reflectance scale
    ``from_scale`` (the stored value of reflectance 1.0) into values at ``to_scale``:
    ``to_scale / from_scale`` for the reflectance bands of ``sensor``, 1 for the others (SAR,
    elevation: no reflectance scale applies). None when the scales are equal (nothing to do)."""
    if float(from_scale) == float(to_scale):
        return None
    optical = set(reflectance_bands(bands, sensor))
    factor = float(to_scale) / float(from_scale)
    return np.array([factor if b in optical else 1.0 for b in bands],
                    dtype=np.float32)[:, None, None]  # fmt: skip


#: Pixels per band and image that :func:`band_medians` keeps (an even subsample beyond that).
MEDIAN_PIXELS = 20000
#: Plausible surface reflectance: the typical (median over bands) band median is at most this,
#: and at least one band median reaches :data:`REFLECTANCE_FLOOR` (a scene darker than that in
#: every band is black, or read at a scale too large).
REFLECTANCE_CEILING = 1.5
REFLECTANCE_FLOOR = 0.002


def band_medians(images: Iterable[np.ndarray], bands: Sequence[str]) -> dict[str, float]:
    """Median of the valid (finite) pixels of each band over ``images`` (each ``(C, H, W)``,
    invalid pixels NaN, bands ``bands`` in channel order), from at most
    :data:`MEDIAN_PIXELS` evenly spaced valid pixels per band and image. Bands without a
    valid pixel are left out."""
    values: list[list[np.ndarray]] = [[] for _ in bands]
    for image in images:
        for k, band in enumerate(image):
            valid = band[np.isfinite(band)]
            values[k].append(valid[:: max(1, valid.size // MEDIAN_PIXELS)])
    return {
        b: float(np.median(np.concatenate(v))) for b, v in zip(bands, values)
        if sum(x.size for x in v)
    }  # fmt: skip


def implausible_reflectance(medians: Mapping[str, float], scale: float, sensor: str,
                            key: str = "dataset.reflectance_scale",
                            ) -> tuple[str, dict[str, float]] | None:  # fmt: skip
    """The reflectance plausibility rule: are values stored at reflectance scale ``scale``
    plausible surface reflectance?

    Only the reflectance bands of ``sensor`` (optical bands spyndex knows) are judged, each by
    its median valid value (:func:`band_medians`) divided by ``scale``. Surface reflectance lies
    in about [0, 1]: the values are refused when the typical band median (the median over the
    bands) exceeds :data:`REFLECTANCE_CEILING` or every band median lies below
    :data:`REFLECTANCE_FLOOR`. Both bounds are physical, not relative to a training set: a dark
    scene (water, 0.01) or a bright one (snow, 0.9) read at the right scale is accepted, while
    a scale off by the factors that occur (x10000 integer products read as float, or the
    reverse; x100 percent) is refused.

    Args:
        medians: band -> median valid value in file units (NaN medians are left out).
        scale: the stored value of reflectance 1.0 the values are read at.
        sensor: spyndex sensor of the bands.
        key: the setting that gives the scale, named in the message (prediction's is
            ``--reflectance-scale``).

    Returns:
        None when plausible (or no band is judged); else ``(message, reflectance)``: a message
        naming each band's median and reflectance and the likely scale, and the reflectance
        median per judged band.
    """
    judged = reflectance_bands(list(medians), sensor)
    raw = {b: float(medians[b]) for b in judged if math.isfinite(medians[b])}
    if not raw:
        return None
    reflectance = {b: v / scale for b, v in raw.items()}
    typical = float(np.median(list(reflectance.values())))
    too_high = typical > REFLECTANCE_CEILING
    too_low = max(abs(v) for v in reflectance.values()) < REFLECTANCE_FLOOR
    if not (too_high or too_low):
        return None
    median_raw = float(np.median([abs(v) for v in raw.values()]))
    guess = 10 ** round(math.log10(median_raw / 0.15)) if median_raw > 0 else None
    likely = (
        f"The files look like they store reflectance x{guess:g}: set {key}={guess:g}"
        if guess and guess != scale
        else f"Check {key} (the file value of reflectance 1.0)"
    )
    shown = ", ".join(f"{b} {raw[b]:.4g} -> {reflectance[b]:.4g}" for b in raw)
    message = (
        f"with reflectance_scale={scale:g} the data are not plausible reflectance: median valid "
        f"value -> reflectance per band {shown} (surface reflectance lies in about 0..1). "
        f"{likely}"
    )
    return message, reflectance
