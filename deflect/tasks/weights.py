"""Class weights of a loss (``loss.class_weights``), for any task that predicts classes."""

from __future__ import annotations

from deflect.data import DataSpec


def class_weights(setting, data: DataSpec, frequencies) -> list[float] | None:
    """``loss.class_weights``: a list, null, or ``median_frequency`` (from the dataset YAML's
    ``class_frequencies``, e.g. MADOS's published ones)."""
    if setting is None:
        return None
    if isinstance(setting, str):
        if setting != "median_frequency":
            raise ValueError(
                f"loss.class_weights={setting!r}: give a list of {data.num_classes} numbers, "
                "null, or median_frequency"
            )
        if not frequencies or len(frequencies) != data.num_classes:
            raise ValueError(
                "loss.class_weights=median_frequency needs dataset.class_frequencies with one "
                f"value per class ({data.num_classes}); the dataset YAML has "
                f"{None if not frequencies else len(frequencies)}"
            )
        return median_frequency_weights([float(f) for f in frequencies])
    return [float(w) for w in setting]


def median_frequency_weights(frequencies: list[float]) -> list[float]:
    """Median frequency balancing (Eigen & Fergus, ICCV 2015): w_c = median(f) / f_c."""
    if any(not f > 0 for f in frequencies):
        raise ValueError(
            f"class frequencies {frequencies} must all be positive for median_frequency weights"
        )
    ordered = sorted(frequencies)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return [median / f for f in frequencies]
