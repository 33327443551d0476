"""The rules that training, evaluation and prediction share (``deflect/rasters.py``,
``deflect/data.py``), each against values worked out by hand: the seeded split and its
rounding, the reflectance factors, the reflectance plausibility rule (and the case where the
two rules it replaces disagreed), the no-data validity rule, band-name resolution."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deflect.data import band_code, invalid_to_nan, valid_pixels
from deflect.rasters import (
    band_medians,
    implausible_reflectance,
    reflectance_factors,
    seeded_split,
    split_sizes,
)

# ---- the seeded split ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "val", "test", "sizes"),
    [
        (10, 0.1, 0.1, (1, 1)),  # 1.0 each
        (25, 0.1, 0.1, (2, 2)),  # 2.5 rounds to the even 2 ...
        (35, 0.1, 0.1, (4, 4)),  # ... and 3.5 to the even 4 (Python's round)
        (5, 0.1, 0.1, (1, 1)),  # 0.5 rounds to 0, but a split asked for gets one item
        (2, 0.1, 0.0, (1, 0)),  # HLS Burn Scars' rule: two chips, one for validation
        (1, 0.1, 0.0, (0, 0)),  # one chip: training keeps it
        (2, 0.1, 0.1, (0, 0)),  # two items, two splits asked for: training keeps them
        (10, 0.0, 0.2, (0, 2)),  # no validation asked for: none
    ],
)
def test_split_sizes_round_each_fraction_and_never_leave_a_split_asked_for_empty(
    n, val, test, sizes
):
    assert split_sizes(n, val, test) == sizes


def test_the_seeded_split_takes_test_then_val_from_numpys_permutation():
    """With seed 0, numpy's ``default_rng(0).permutation(10)`` is 4 6 2 7 3 5 9 0 8 1: test is
    item 4, val item 6, train the rest, each in the original order."""
    items = [f"s{i}" for i in range(10)]
    assert seeded_split(items, "test", 0.1, 0.1, 0) == ["s4"]
    assert seeded_split(items, "val", 0.1, 0.1, 0) == ["s6"]
    assert seeded_split(items, "train", 0.1, 0.1, 0) == [f"s{i}" for i in (0, 1, 2, 3, 5, 7, 8, 9)]
    with pytest.raises(ValueError, match=r"val_fraction=0.6 and test_fraction=0.5 must be"):
        seeded_split(items, "train", 0.6, 0.5, 0)


# ---- the reflectance scale ----------------------------------------------------------------------


def test_reflectance_factors_rescale_the_reflectance_bands_only():
    factors = reflectance_factors(["B2", "B8", "VV"], "sentinel2a", 10000.0, 1.0)
    assert factors.shape == (3, 1, 1)
    np.testing.assert_allclose(factors.ravel(), [1e-4, 1e-4, 1.0])  # SAR has no reflectance
    assert reflectance_factors(["B2"], "sentinel2a", 10000.0, 10000.0) is None


def test_band_medians_pool_the_valid_pixels_of_every_image():
    a = np.array([[[1.0, 2.0, np.nan]], [[np.nan, np.nan, np.nan]]], dtype=np.float32)
    b = np.array([[[3.0, np.inf, 10.0]], [[np.nan, np.nan, np.nan]]], dtype=np.float32)
    # band B2: 1, 2, 3, 10 -> median 2.5; band B3: no valid pixel -> left out
    assert band_medians([a, b], ["B2", "B3"]) == {"B2": 2.5}


def test_a_scale_off_by_orders_of_magnitude_is_refused_with_the_likely_scale():
    """Integer L2A values read as float reflectance: medians 500, 700, 800 at scale 1 are
    reflectance 700 typical (> 1.5); 700 / 0.15 = 4667, whose power of ten is 10^4."""
    message, reflectance = implausible_reflectance(
        {"B2": 500.0, "B3": 700.0, "B4": 800.0}, 1.0, "sentinel2a"
    )
    assert "set dataset.reflectance_scale=10000" in message
    assert "B3 700 -> 700" in message and reflectance == {"B2": 500, "B3": 700, "B4": 800}
    # Float reflectance read as x10000: 0.05 .. 0.09 / 10000 < 0.002 in every band; 0.07 / 0.15
    # is 0.47, whose power of ten is 10^0.
    message, _ = implausible_reflectance(
        {"B2": 0.05, "B3": 0.07, "B4": 0.09}, 10000.0, "sentinel2a"
    )
    assert message.endswith("set dataset.reflectance_scale=1")
    # prediction names its own setting
    message, _ = implausible_reflectance({"B2": 0.05}, 10000.0, "sentinel2a", "--reflectance-scale")
    assert message.endswith("set --reflectance-scale=1")


def test_a_dark_or_bright_scene_at_the_right_scale_is_plausible_reflectance():
    """Where the two old rules disagreed. The dataset rule judged the values themselves
    (reflectance in about 0..1); prediction's rule compared a scene's medians with the training
    means and warned when most bands differed by more than 20x. A lake (reflectance 0.012,
    0.010, 0.008, 0.005 in B2, B3, B4, B8) for a model trained on bright fields (means 0.30,
    0.32, 0.34, 0.40) differs by 25x to 80x in every band: prediction's rule called it "another
    reflectance scale", the dataset rule accepted it. The dataset rule is right: those are the
    reflectances of dark water at the trained scale; a difference from the training means is a
    change of scene, which rescaling would make wrong. Snow (0.9) is the bright counterpart.
    The merged rule is the physical one."""
    lake = {"B2": 0.012, "B3": 0.010, "B4": 0.008, "B8": 0.005}
    fields = {"B2": 0.30, "B3": 0.32, "B4": 0.34, "B8": 0.40}
    assert all(max(fields[b] / lake[b], lake[b] / fields[b]) > 20 for b in lake)  # old warning
    assert implausible_reflectance(lake, 1.0, "sentinel2a") is None
    assert implausible_reflectance({b: 9000.0 for b in lake}, 10000.0, "sentinel2a") is None


def test_bands_that_are_not_reflectance_are_not_judged():
    """SAR backscatter in dB (-15) and a NaN median say nothing about a reflectance scale."""
    assert implausible_reflectance({"VV": -15.0, "VH": -22.0}, 1.0, "sentinel2a") is None
    assert implausible_reflectance({"B2": math.nan, "VV": 3000.0}, 1.0, "sentinel2a") is None


# ---- no-data validity and band names ------------------------------------------------------------


def test_a_pixel_is_valid_when_finite_and_not_the_no_data_value_compared_in_the_files_dtype():
    ints = np.array([[-9999, 0, 16777217]], dtype=np.int32)
    # 16777217 is not the no-data value 16777216, though both are 16777216.0 in float32
    assert valid_pixels(ints, 16777216).tolist() == [[True, True, True]]
    assert valid_pixels(ints, -9999).tolist() == [[False, True, True]]
    assert valid_pixels(ints, [-9999, 0]).tolist() == [[False, False, True]]
    floats = np.array([np.nan, np.inf, 5.0, 0.0], dtype=np.float32)
    assert valid_pixels(floats, None).tolist() == [False, False, True, True]
    out = invalid_to_nan(floats, 0.0)
    assert out.dtype == np.float32 and np.isnan(out[[0, 1, 3]]).all() and out[2] == 5.0


@pytest.mark.parametrize(
    ("name", "sensor", "code"),
    [
        ("NIR", "sentinel2a", "B8"),
        ("842 nm", "sentinel2a", "B8"),
        ("b02", "sentinel2a", "B2"),
        ("NIR", "landsat8", "B5"),  # Landsat 8 has only the narrow NIR band, B5 (865 nm)
        ("vv", "sentinel2a", "VV"),  # not a band spyndex knows: kept, spelt canonically
    ],
)
def test_band_names_resolve_to_the_sensors_codes(name, sensor, code):
    assert band_code(name, sensor) == code
