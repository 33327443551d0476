"""What a regression run's test split leaves behind.

* ``predictions/<sample>.tif``: float32 GeoTIFF, one band per target named after it, the input's
  CRS and transform, the no-data value where no input band held data;
* ``test_scatter.png``: predicted against true values per target (a hexagonal density for many
  pixels, points for few), the 1:1 line, R² and RMSE of the whole test split in the titles
  (also in the PNG's ``Description`` text);
* ``test_errors.png``: a few test images, a row per target: the input's colour composite, the
  target, the prediction (one colour scale) and the error (prediction - target) on a diverging
  colour map centred at 0.

Pictures are drawn with matplotlib's object interface (no pyplot state, no display).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine

from deflect.io import atomic_path
from deflect.tasks.regression.metrics import SUMS, metrics_from_sums, regression_sums

#: Value of the GeoTIFF predictions where every input band is invalid (``task.nodata``).
NODATA = -9999.0
#: Above this many points a scatter plot is drawn as a hexagonal density.
HEXBIN_ABOVE = 2000


def write_regression_geotiff(values: np.ndarray, path: Path, crs, transform, names: list[str],
                             nodata: float = NODATA) -> None:  # fmt: skip
    """``values`` ``(T, H, W)`` as a float32 GeoTIFF: band ``t`` described as ``names[t]``, the
    source's CRS and transform (an identity without a CRS is no georeference and is left out),
    ``nodata`` declared; the ordered names also in the file tag ``targets``."""
    count, height, width = values.shape
    profile = {"driver": "GTiff", "height": height, "width": width, "count": count,
               "dtype": "float32", "nodata": nodata, "compress": "deflate"}  # fmt: skip
    if crs is not None:
        profile["crs"] = crs
    if transform is not None and (crs is not None or transform != Affine.identity()):
        profile["transform"] = transform
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for t, name in enumerate(names):
            dst.set_band_description(t + 1, str(name))
        dst.update_tags(targets=",".join(str(n) for n in names))
        dst.write(values.astype(np.float32))


class PixelSample:
    """A uniform random sample of at most ``size`` (true, predicted) pairs per target from all
    the valid pixels seen: each pair draws a random key and the ``size`` smallest keys stay, so
    the sample does not depend on the order of the batches, and samples of several ranks merge
    into a sample of their union (:meth:`merge`)."""

    def __init__(self, count: int, size: int = 100_000, seed: int = 0) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)
        empty = np.empty((3, 0), dtype=np.float64)
        self.kept = [empty] * count  # per target: rows key, true, predicted

    def add(self, prediction: np.ndarray, target: np.ndarray) -> None:
        """``(B, T, H, W)`` arrays; pixels whose target is not finite are left out."""
        for t in range(target.shape[1]):
            y, p = target[:, t].ravel(), prediction[:, t].ravel()
            valid = np.isfinite(y)
            keys = self.rng.random(int(valid.sum()))
            self.kept[t] = self._smallest(np.concatenate(
                [self.kept[t], np.stack([keys, y[valid], p[valid]])], axis=1))  # fmt: skip

    def _smallest(self, rows: np.ndarray) -> np.ndarray:
        if rows.shape[1] <= self.size:
            return rows
        return rows[:, np.argpartition(rows[0], self.size)[: self.size]]

    def merge(self, others: list[PixelSample]) -> None:
        """Add the pairs of other samples (e.g. every rank's)."""
        for t in range(len(self.kept)):
            self.kept[t] = self._smallest(np.concatenate([o.kept[t] for o in [self, *others]], 1))

    def pairs(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(true, predicted) of target ``t``."""
        return self.kept[t][1], self.kept[t][2]


def scatter_title(name: str, metrics: dict) -> str:
    """A scatter plot's title: the target and its R² and RMSE over the whole split."""
    r2, rmse = metrics["r2"], metrics["rmse"]
    r2_text = "n/a" if r2 is None else f"{r2:.3f}"
    rmse_text = "n/a" if rmse is None else f"{rmse:.4g}"
    return f"{name}: R² {r2_text}, RMSE {rmse_text} ({metrics['pixels']} px)"


def save_scatter_png(sample: PixelSample, metrics: dict, path: Path) -> None:
    """Predicted against true per target (:class:`PixelSample`), the 1:1 line, and the titles of
    :func:`scatter_title`, which the PNG's ``Description`` also holds (one line per target)."""
    from matplotlib.figure import Figure

    names = list(metrics["per_target"])
    columns = min(len(names), 3)
    rows = -(-len(names) // columns)
    figure = Figure(figsize=(4.2 * columns, 4.0 * rows), layout="constrained")
    titles = []
    for t, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, t + 1)
        true, predicted = sample.pairs(t)
        titles.append(scatter_title(name, metrics["per_target"][name]))
        axes.set_title(titles[-1], fontsize=9)
        axes.set_xlabel(f"true {name}")
        axes.set_ylabel(f"predicted {name}")
        if true.size == 0:
            continue
        if true.size > HEXBIN_ABOVE:
            cells = axes.hexbin(true, predicted, gridsize=60, bins="log", mincnt=1, cmap="viridis")
            figure.colorbar(cells, ax=axes, label="pixels (log)")
        else:
            axes.scatter(true, predicted, s=6, alpha=0.6, linewidths=0)
        low = float(min(true.min(), predicted.min()))
        high = float(max(true.max(), predicted.max()))
        axes.plot([low, high], [low, high], color="black", linewidth=1, label="1:1")
        axes.legend(loc="upper left", fontsize=8)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, metadata={"Description": "\n".join(titles)})


def display_rgb(image: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` bands (or 1, drawn grey) -> ``(H, W, 3)`` in [0, 1], each band stretched
    between its 2nd and 98th percentile of valid values; invalid (NaN) pixels black."""
    if image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    out = np.zeros(image.shape[1:] + (3,))
    for c in range(3):
        band = image[c]
        valid = np.isfinite(band)
        if valid.any():
            low, high = np.percentile(band[valid], [2, 98])
            out[..., c] = np.where(valid, np.clip((band - low) / max(high - low, 1e-6), 0, 1), 0)
    return out


def save_error_panels(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], names: list[str],
                      path: Path, image_title: str = "RGB") -> None:  # fmt: skip
    """One PNG: per image and target a row of the colour composite, the target, the prediction
    (on one colour scale: the 2nd-98th percentile of both) and the error prediction - target
    (``RdBu_r`` symmetric about 0, to the 98th percentile of its magnitude). ``rows`` hold
    (display image ``(3, H, W)``, target ``(T, H, W)``, prediction ``(T, H, W)``); NaN grey."""
    import matplotlib
    from matplotlib.figure import Figure

    lines = [(rgb, t, target[t], prediction[t])
             for rgb, target, prediction in rows for t in range(len(names))]  # fmt: skip
    figure = Figure(figsize=(13, 3.0 * len(lines)), layout="constrained")
    grid = figure.subplots(len(lines), 4, squeeze=False)
    values_map = matplotlib.colormaps["viridis"].with_extremes(bad="0.6")
    error_map = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.6")
    for r, (rgb, t, target, prediction) in enumerate(lines):
        error = prediction - target
        both = np.concatenate([target[np.isfinite(target)], prediction[np.isfinite(prediction)]])
        low, high = np.percentile(both, [2, 98]) if both.size else (0.0, 1.0)
        finite = np.abs(error[np.isfinite(error)])
        reach = max(float(np.percentile(finite, 98)) if finite.size else 1.0, 1e-12)
        axes = grid[r]
        axes[0].imshow(display_rgb(rgb), interpolation="nearest")
        axes[0].set_title(image_title, fontsize=9)
        for a, (title, values, cmap, limits) in enumerate((
            (f"target {names[t]}", target, values_map, (low, high)),
            (f"prediction {names[t]}", prediction, values_map, (low, high)),
            ("error (prediction - target)", error, error_map, (-reach, reach)),
        ), start=1):  # fmt: skip
            shown = axes[a].imshow(values, cmap=cmap, vmin=limits[0], vmax=limits[1],
                                   interpolation="nearest")  # fmt: skip
            axes[a].set_title(title, fontsize=9)
            figure.colorbar(shown, ax=axes[a], shrink=0.8)
        for a in axes:
            a.set_xticks([])
            a.set_yticks([])
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)


class RegressionWriter:
    """Records each evaluated batch (the engine calls it with ``(batch, prediction, output)``)
    and writes the outputs of the module docstring; under torchrun the scatter plot's sums and
    pixel sample are gathered by rank 0, which draws the pictures.

    Args:
        dataset: the evaluated dataset (``spec``, ``sample_name``, ``georeference``).
        out_dir: the run's folder; GeoTIFFs go to ``out_dir/predictions/``.
        names: the targets' names (band descriptions, titles).
        num_panels: images shown in ``test_errors.png`` (rank 0).
        write_geotiffs: write each prediction as a GeoTIFF.
        is_main: whether this rank draws.
        info: rank and world size (for the gather), or None.
        nodata: the GeoTIFFs' no-data value.
        max_points: the scatter plot's sample per target.
    """

    def __init__(self, dataset, out_dir: Path, names: list[str], num_panels: int,
                 write_geotiffs: bool, is_main: bool, info=None, nodata: float = NODATA,
                 max_points: int = 100_000) -> None:  # fmt: skip
        spec = dataset.spec
        self.dataset, self.out_dir, self.names, self.info = dataset, Path(out_dir), names, info
        self.rgb_index = spec.index_of(spec.display_bands, "the prediction pictures")
        self.mean = np.asarray(spec.mean_list(), dtype=np.float32)[self.rgb_index, None, None]
        self.std = np.asarray(spec.std_list(), dtype=np.float32)[self.rgb_index, None, None]
        self.is_main = is_main
        self.num_panels = num_panels if is_main else 0
        self.write_geotiffs = write_geotiffs
        self.nodata = float(nodata)
        self.sums = torch.zeros((len(names), len(SUMS)), dtype=torch.float64)
        self.sample = PixelSample(len(names), max_points, seed=getattr(info, "rank", 0))
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __call__(self, batch: dict, prediction: torch.Tensor, output=None) -> None:
        """Record one evaluated batch: ``prediction`` ``(B, T, H, W)``."""
        prediction = prediction.detach().float().cpu()
        target = batch["target"].float()
        self.sums += regression_sums(prediction, target)
        self.sample.add(prediction.numpy(), target.numpy())
        empty = torch.isnan(batch["image"]).all(dim=1).numpy()  # (B, H, W): nothing to predict
        for j, index in enumerate(batch["index"].tolist()):
            values = prediction[j].numpy()
            if self.write_geotiffs:
                crs, transform = self.dataset.georeference(index)
                write_regression_geotiff(
                    np.where(empty[j], self.nodata, values),
                    self.out_dir / "predictions" / f"{self.dataset.sample_name(index)}.tif",
                    crs, transform, self.names, self.nodata,
                )  # fmt: skip
            if len(self.rows) < self.num_panels and np.isfinite(target[j].numpy()).any():
                image = batch["image"][j].numpy()[self.rgb_index] * self.std + self.mean
                self.rows.append((image, target[j].numpy(), np.where(empty[j], np.nan, values)))

    def finish(self, out_dir: Path) -> None:
        """Gather every rank's sums and sample; rank 0 writes ``test_scatter.png`` and
        ``test_errors.png``."""
        sums, sample = self.sums, self.sample
        if self.info is not None and getattr(self.info, "distributed", False):
            import torch.distributed as dist

            gathered: list = [None] * self.info.world_size
            dist.all_gather_object(gathered, (sums, sample))
            sums = sum(s for s, _ in gathered)
            sample.merge([s for r, (_, s) in enumerate(gathered) if r != self.info.rank])
        if not self.is_main:
            return
        out_dir = Path(out_dir)
        save_scatter_png(sample, metrics_from_sums(sums, self.names), out_dir / "test_scatter.png")
        if self.rows:
            title = " / ".join(self.dataset.spec.display_bands)
            save_error_panels(self.rows, self.names, out_dir / "test_errors.png", title)
