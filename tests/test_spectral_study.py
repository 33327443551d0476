"""scripts/spectral_study.py: the planted tasks hide their classes where they say they do, the
two oracles and the linear probe give hand-computed answers, and the study runs end to end
(``--quick``, slow) choosing on validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import load_script


def study():
    return load_script("spectral_study")


def pixels(task: str, n: int = 30, size: int = 64):
    s = study()
    rng = np.random.default_rng(1)
    tiles = [s.planted_tile(task, rng, size) for _ in range(n)]
    image = np.concatenate([t[0].reshape(7, -1) for t in tiles], axis=1)  # (7, pixels)
    mask = np.concatenate([t[1].ravel() for t in tiles])
    return image, mask, s.BANDS


def best_threshold_accuracy(values: np.ndarray, labels: np.ndarray) -> float:
    """The best accuracy of one threshold on ``values`` between two classes (either side)."""
    grid = np.quantile(values, np.linspace(0.01, 0.99, 99))
    return max(max(((values > t) == labels).mean(), ((values <= t) == labels).mean()) for t in grid)


def test_rededge_subclasses_differ_beyond_rgb_and_a_band_ratio_beats_the_band():
    """Healthy and stressed vegetation share RGB; their NIR differs by less than the tile's
    illumination gain moves it, so NIR over SWIR (gain-free, as NDMI) separates them better
    than NIR alone (per pixel, about 0.75 against 0.69 with one threshold)."""
    image, mask, bands = pixels("rededge_subclass")
    veg = (mask == 1) | (mask == 2)
    healthy = (mask[veg] == 1).astype(int)
    b = {name: image[bands.index(name)][veg] for name in bands}
    for name in ("B2", "B3", "B4"):
        assert best_threshold_accuracy(b[name], healthy) < 0.62, name
    nir = best_threshold_accuracy(b["B8A"], healthy)
    ratio = best_threshold_accuracy(b["B8A"] / b["B11"], healthy)
    assert ratio > nir + 0.03, (ratio, nir)
    water, bare = (image[:, mask == c].mean(1) for c in (0, 3))
    rgb = [bands.index(x) for x in ("B2", "B3", "B4")]
    assert np.abs(water[rgb] - bare[rgb]).min() > 0.04  # the main classes show in RGB


def test_index_threshold_classes_are_ndvi_bins_that_red_alone_cannot_tell():
    image, mask, bands = pixels("index_threshold")
    red, nir = image[bands.index("B4")], image[bands.index("B8A")]
    ndvi = (nir - red) / (nir + red)
    assert (np.digitize(ndvi, [0.25, 0.5]) == mask).mean() > 0.75  # noise blurs the edges
    best = max((np.digitize(red, [a, b]) == mask).mean() if a < b else 0
               for a in np.linspace(0, 0.2, 21) for b in np.linspace(0, 0.2, 21))  # fmt: skip
    assert best < 0.65


def test_miou_and_the_patch_oracle_against_hand_counts():
    """A 4x4 mask, patch 2: the top-left patch holds three 1s and one 0 (majority 1), the others
    are pure. Patch oracle: the left half is called 1, the right half 0: class 0 IoU 8/9 (8 hits,
    9 zeros in the truth), class 1 IoU 7/8 (7 ones, 8 called)."""
    s = study()
    mask = np.array([[0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])[None]
    assert s.patch_oracle(mask, 2, patch=2) == pytest.approx(100 * (8 / 9 + 7 / 8) / 2)
    assert s.miou(np.zeros(4, int), np.array([0, 0, 1, 1]), 2) == pytest.approx(25.0)


def test_the_ridge_probe_reads_a_linear_code_and_not_noise():
    s = study()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    x = rng.normal(0, 1, (600, 10))
    x[:, 0] += 6 * (y == 1)
    x[:, 1] += 6 * (y == 2)
    assert s.ridge_probe(x[:400], y[:400], x[400:], y[400:], 3) > 95
    shuffled = rng.permutation(y)
    assert s.ridge_probe(x[:400], shuffled[:400], x[400:], shuffled[400:], 3) < 50


def test_the_patch_majority_is_row_major_and_matches_the_oracle():
    s = study()
    mask = np.zeros((1, 16, 16), int)
    mask[0, :8, 8:] = 2  # top-right patch of the 2 x 2 grid (patch 8)
    mask[0, 8:, :8] = 1
    assert s.patch_majority(mask, 3).tolist() == [0, 2, 1, 0]


@pytest.mark.slow
def test_the_quick_study_runs_end_to_end_and_chooses_on_validation(tmp_path):
    """Oracles, pretraining, both sweeps, selection, report and plot in a few minutes; every
    contestant's choice is its best validation candidate; DEFLECT's family is one contestant."""
    s = study()
    assert s.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "study.json").read_text())
    scale = s.SCALES["quick"]
    assert set(result["oracles"]) == set(scale.tasks)
    methods = {r["method"] for r in result["results"].values()}
    assert methods == {"frozen", "spectral_kernel_new", "deflect"}
    for name, r in result["results"].items():
        best = max(r["candidates"], key=lambda c: c["validation"])
        assert r["validation"] == pytest.approx(best["validation"]), name
        assert {int(k) for k in r["test"]} == {0, *scale.seeds}, name
    deflect = [r for r in result["results"].values() if r["method"] == "deflect"]
    assert all(r["chosen"]["finetune"] in ("deflect_hard", "deflect_embedding") for r in deflect)
    text = (tmp_path / "study.md").read_text()
    assert "Per-pixel oracle" in text and "paired by seed" in text
    assert (tmp_path / "study.png").stat().st_size > 10_000
    diagnostics = json.loads((tmp_path / "diagnostics.json").read_text())
    hard = next(v for k, v in diagnostics.items() if k.endswith("deflect_hard"))["blocks"][0]
    assert hard["added"] == pytest.approx(hard["delta_rgb"], rel=1e-4)  # hard keeps ‖δ_RGB‖
