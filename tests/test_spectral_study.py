"""scripts/spectral_study.py: the planted tasks hide their classes where they say they do, and
the study runs end to end (``--quick``, slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import load_script


def study():
    return load_script("spectral_study")


def pixels(task: str, n: int = 12, size: int = 48):
    s = study()
    rng = np.random.default_rng(1)
    tiles = [s.planted_tile(task, rng, size) for _ in range(n)]
    image = np.concatenate([t[0].reshape(7, -1) for t in tiles], axis=1)  # (7, pixels)
    mask = np.concatenate([t[1].ravel() for t in tiles])
    return image, mask, s.BANDS


def test_spectral_only_classes_share_their_rgb_statistics_and_differ_in_nir_swir():
    image, mask, bands = pixels("spectral_only")
    rgb = [bands.index(b) for b in ("B2", "B3", "B4")]
    rest = [bands.index(b) for b in ("B8A", "B11", "B12")]
    means = np.stack([image[:, mask == c].mean(1) for c in range(3)])  # (class, band)
    stds = np.stack([image[:, mask == c].std(1) for c in range(3)])
    assert np.ptp(means[:, rgb], axis=0).max() < 0.006  # the same colour, to the noise
    assert np.ptp(stds[:, rgb], axis=0).max() < 0.004
    assert np.ptp(means[:, rest], axis=0).min() > 0.1  # NIR and SWIR tell them apart


def test_rededge_subclasses_differ_only_beyond_rgb():
    image, mask, bands = pixels("rededge_subclass")
    healthy, stressed = (image[:, mask == c].mean(1) for c in (1, 2))
    rgb = [bands.index(b) for b in ("B2", "B3", "B4")]
    assert np.abs(healthy[rgb] - stressed[rgb]).max() < 0.006
    assert healthy[bands.index("B8A")] - stressed[bands.index("B8A")] > 0.1
    water, bare = (image[:, mask == c].mean(1) for c in (0, 3))
    assert np.abs(water[rgb] - bare[rgb]).min() > 0.04  # the main classes show in RGB


def test_index_threshold_classes_are_ndvi_bins_that_red_alone_cannot_tell():
    image, mask, bands = pixels("index_threshold", n=30)
    red, nir = image[bands.index("B4")], image[bands.index("B8A")]
    ndvi = (nir - red) / (nir + red)
    # Per-pixel noise (sigma 0.015) and the tile gain blur the pixels near a threshold.
    assert (np.digitize(ndvi, [0.25, 0.5]) == mask).mean() > 0.8
    best = max((np.digitize(red, [a, b]) == mask).mean() if a < b else 0
               for a in np.linspace(0, 0.2, 21) for b in np.linspace(0, 0.2, 21))  # fmt: skip
    assert best < 0.65


@pytest.mark.slow
def test_the_quick_study_runs_end_to_end(tmp_path):
    """Pretraining, 4 arms x 3 tasks, table, plot and diagnostics in a few minutes. The planted
    NIR/SWIR signal reaches the model through the spectral kernel, never through RGB alone."""
    s = study()
    assert s.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "study.json").read_text())
    assert set(results) == {"spectral_only", "rededge_subclass", "index_threshold"}
    only = results["spectral_only"]
    assert set(only) == set(s.QUICK_ARMS)
    assert only["spectral_kernel"]["mIoU"][0] > only["frozen"]["mIoU"][0] + 10
    text = (tmp_path / "study.md").read_text()
    for arm in s.QUICK_ARMS:
        assert f"| {arm} |" in text
    assert "What the spectral stream let through" in text
    diagnostics = json.loads((tmp_path / "diagnostics.json").read_text())
    hard = diagnostics["spectral_only / deflect_hard"]["blocks"][0]
    assert hard["added"] == pytest.approx(hard["delta_rgb"], rel=1e-4)  # hard keeps ‖δ_RGB‖
    assert (tmp_path / "study.png").stat().st_size > 10_000
