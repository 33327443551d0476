"""What a run leaves to look at: PNG panels (RGB | ground truth | prediction) and GeoTIFF
predictions carrying the source tile's georeferencing."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine
from PIL import Image, ImageDraw

from deflect.io import atomic_path

log = logging.getLogger(__name__)

# A qualitative palette (tab20-like); the ignore index is drawn black.
PALETTE = np.array(
    [
        [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
        [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
        [174, 199, 232], [255, 187, 120], [152, 223, 138], [255, 152, 150], [197, 176, 213],
        [196, 156, 148], [247, 182, 210], [199, 199, 199], [219, 219, 141], [158, 218, 229],
    ],
    dtype=np.uint8,
)  # fmt: skip


def colorize(mask: np.ndarray, ignore_index: int) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 colours; ignored pixels black."""
    out = PALETTE[np.clip(mask, 0, None) % len(PALETTE)]
    out[mask == ignore_index] = 0
    return out


def stretch_limits(images: list[np.ndarray]) -> list[tuple[float, float]]:
    """One stretch for several (3, H, W) images (or 1 band): per channel, the 2nd and 98th
    percentile of the valid pixels of all of them together, so that equal values look equal in
    every image, and a uniform image keeps its brightness relative to the others."""
    out = []
    for c in range(images[0].shape[0] if images else 0):
        values = np.concatenate([im[c][np.isfinite(im[c])] for im in images])
        out.append(tuple(float(v) for v in np.percentile(values, [2, 98])) if values.size
                   else (0.0, 1.0))  # fmt: skip
    return out


def rgb_composite(image: np.ndarray, limits: list[tuple[float, float]] | None = None) -> np.ndarray:
    """(3, H, W) bands (or 1 band, drawn grey) -> (H, W, 3) uint8, each band stretched between
    ``limits`` (default: its own 2nd and 98th percentile of valid pixels; several images shown
    side by side take common limits from :func:`stretch_limits`); invalid (NaN) pixels are
    black."""
    if image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
        limits = None if limits is None else limits * 3
    limits = limits or stretch_limits([image])
    out = np.zeros(image.shape[1:] + (3,), dtype=np.uint8)
    for c in range(3):
        band = image[c]
        valid = np.isfinite(band)
        if not valid.any():
            continue
        lo, hi = limits[c]
        scaled = np.clip((np.where(valid, band, lo) - lo) / max(hi - lo, 1e-6), 0, 1)
        out[..., c] = np.where(valid, scaled * 255, 0).astype(np.uint8)
    return out


def save_panels(
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    class_names: list[str],
    ignore_index: int,
    path: Path,
    scale: int = 4,
    image_title: str = "RGB",
) -> None:
    """Write one PNG: a row per tile of image | ground truth | prediction, and a class legend."""
    if not rows:
        return
    h, w = rows[0][1].shape
    sh, sw = h * scale, w * scale
    gap, header, legend_h = 4, 16, 16 * ((len(class_names) + 3) // 4) + 8
    width = 3 * sw + 4 * gap
    canvas = Image.new("RGB", (width, header + len(rows) * (sh + gap) + legend_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate((image_title, "ground truth", "prediction")):
        draw.text((gap + i * (sw + gap), 2), title, fill="black")
    for r, (rgb, target, prediction) in enumerate(rows):
        top = header + r * (sh + gap)
        for i, panel in enumerate(
            (rgb, colorize(target, ignore_index), colorize(prediction, ignore_index))
        ):
            tile = Image.fromarray(panel).resize((sw, sh), Image.NEAREST)
            canvas.paste(tile, (gap + i * (sw + gap), top))
    top = header + len(rows) * (sh + gap) + 4
    for k, name in enumerate(class_names):
        x, y = gap + (k % 4) * (width // 4), top + 16 * (k // 4)
        draw.rectangle(
            [x, y, x + 10, y + 10], fill=tuple(int(v) for v in PALETTE[k % len(PALETTE)])
        )
        draw.text((x + 14, y - 1), name, fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


#: Class-map value of pixels where every input band is invalid (evaluation's GeoTIFFs and
#: ``scripts/predict.py`` alike).
NODATA_CLASS = 255


def class_colours(num_classes: int) -> dict[int, tuple[int, int, int, int]]:
    """The colour table of a class map: class ``k`` in its colour in the pictures
    (:data:`PALETTE`, as :func:`colorize` draws it), :data:`NODATA_CLASS` transparent black."""
    colours = {k: (*(int(v) for v in PALETTE[k % len(PALETTE)]), 255) for k in range(num_classes)}
    colours[NODATA_CLASS] = (0, 0, 0, 0)
    return colours


def describe_classes(dst, class_names, band: int = 1) -> None:
    """Make band ``band`` of an open class-map GeoTIFF explain itself: its colour table
    (:func:`class_colours`), the description ``class``, one band tag per value naming its class
    (``0=bare``, ..., ``255=no data``, shown by ``gdalinfo`` and QGIS's metadata), and the
    ordered names in the file tag ``classes``. Call it before the pixels are written: GDAL
    changes a tiled file's photometric tag to palette only then (else it logs an error)."""
    names = [str(c) for c in class_names]
    dst.write_colormap(band, class_colours(len(names)))
    dst.set_band_description(band, "class")
    dst.update_tags(band, **{str(k): name for k, name in enumerate(names)},
                    **{str(NODATA_CLASS): "no data"})  # fmt: skip
    dst.update_tags(classes=",".join(names))


def describe_labels(dst, class_names) -> None:
    """A multi-label raster (one 0/1 band per label): each band named after its label, its
    values explained in band tags (``0=absent``, ``1=present``, ``255=no data``), the ordered
    names in the file tag ``classes``."""
    names = [str(c) for c in class_names]
    for k, name in enumerate(names):
        dst.set_band_description(k + 1, name)
        dst.update_tags(k + 1, **{"0": "absent", "1": "present", str(NODATA_CLASS): "no data"})
    dst.update_tags(classes=",".join(names))


def write_prediction_geotiff(
    prediction: np.ndarray, path: Path, crs, transform, class_names: list[str]
) -> None:
    """A single-band uint8 GeoTIFF of class indices with the source CRS and transform;
    :data:`NODATA_CLASS` (declared as its no-data value) where the input had no valid band."""
    profile = {
        "driver": "GTiff",
        "height": prediction.shape[0],
        "width": prediction.shape[1],
        "count": 1,
        "dtype": "uint8",
        "nodata": NODATA_CLASS,
        "compress": "deflate",
    }
    if crs is not None:
        profile["crs"] = crs
    if transform is not None and (crs is not None or transform != Affine.identity()):
        profile["transform"] = transform  # an identity without a CRS: a file with no georeference
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        describe_classes(dst, class_names)  # before the pixels: GDAL sets a palette only then
        dst.write(prediction.astype(np.uint8), 1)


class PredictionWriter:
    """Collects the first ``num_panels`` tiles for the PNG and writes every prediction as GeoTIFF.

    Args:
        dataset: the evaluated dataset (names, georeferencing, and its ``spec``: display bands,
            band statistics, classes).
        out_dir: the run's folder; GeoTIFFs go to ``out_dir/predictions/``.
        num_panels: tiles shown in the PNG (rank 0 only).
        write_geotiffs: also write each prediction as a GeoTIFF.
        is_main: whether this rank collects panels.
    """

    def __init__(
        self,
        dataset,
        out_dir: Path,
        num_panels: int,
        write_geotiffs: bool,
        is_main: bool,
    ) -> None:
        spec = dataset.spec
        self.dataset = dataset
        self.out_dir = out_dir
        self.rgb_index = spec.index_of(spec.display_bands, "the prediction pictures")
        self.mean = np.asarray(spec.mean_list(), dtype=np.float32)[self.rgb_index, None, None]
        self.std = np.asarray(spec.std_list(), dtype=np.float32)[self.rgb_index, None, None]
        self.num_panels = num_panels if is_main else 0
        self.write_geotiffs = write_geotiffs
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __call__(self, batch: dict, prediction: torch.Tensor, output=None) -> None:
        """Record one evaluated batch."""
        prediction = prediction.cpu().numpy().astype(np.uint8)
        # Where no band holds data there is nothing to predict: no-data, as scripts/predict.py.
        prediction[torch.isnan(batch["image"]).all(dim=1).numpy()] = NODATA_CLASS
        for j, index in enumerate(batch["index"].tolist()):
            if self.write_geotiffs:
                crs, transform = self.dataset.georeference(index)
                name = self.dataset.sample_name(index)
                write_prediction_geotiff(
                    prediction[j],
                    self.out_dir / "predictions" / f"{name}.tif",
                    crs,
                    transform,
                    self.dataset.classes,
                )
            if len(self.rows) < self.num_panels:
                image = batch["image"][j].numpy()[self.rgb_index] * self.std + self.mean
                shown = np.where(prediction[j] == NODATA_CLASS, self.dataset.ignore_index,
                                 prediction[j])  # fmt: skip
                self.rows.append((rgb_composite(image), batch["mask"][j].numpy(), shown))

    def finish(self, out_dir: Path) -> None:
        """Write the collected panels as ``test_predictions.png`` (rank 0)."""
        if self.num_panels:
            self.save_png(Path(out_dir) / "test_predictions.png")

    def save_png(self, path: Path) -> None:
        """Write the collected panels."""
        title = " / ".join(self.dataset.spec.display_bands)  # e.g. "B4 / B3 / B2"
        save_panels(self.rows, self.dataset.classes, self.dataset.ignore_index, path,
                    image_title=title)  # fmt: skip


class ClassificationWriter:
    """What a classification run's test split leaves: ``predictions.csv`` (one row per sample:
    ``sample``, ``label``, ``prediction`` and one probability column per class; label sets as
    ``;``-joined class names) and ``test_predictions.png`` (a few samples: colour composite,
    true and predicted labels). Under torchrun each rank's rows are gathered by rank 0.

    Args:
        dataset: the evaluated dataset (names, classes, ``spec``).
        out_dir: where the files go.
        num_panels: samples shown in the PNG.
        is_main: whether this rank writes.
        task: the classification task (its probabilities and multi-label flag).
        info: rank and world size (for the gather).
    """

    def __init__(self, dataset, out_dir: Path, num_panels: int, is_main: bool, task,
                 info=None) -> None:  # fmt: skip
        spec = dataset.spec
        self.dataset, self.out_dir, self.task, self.info = dataset, out_dir, task, info
        self.is_main = is_main
        self.num_panels = num_panels if is_main else 0
        self.rgb_index = spec.index_of(spec.display_bands, "the prediction pictures")
        self.mean = np.asarray(spec.mean_list(), dtype=np.float32)[self.rgb_index, None, None]
        self.std = np.asarray(spec.std_list(), dtype=np.float32)[self.rgb_index, None, None]
        self.rows: list[tuple[int, str, str, str, list[float]]] = []
        # The first ``num_panels`` misclassified samples and the first correct ones, as
        # (display bands in file units, true, predicted): the picture shows the former first.
        self.wrong: list[tuple[np.ndarray, str, str]] = []
        self.right: list[tuple[np.ndarray, str, str]] = []

    def _names(self, label) -> str:
        classes = self.dataset.classes
        if self.task.multi_label:
            return ";".join(c for c, v in zip(classes, label) if v >= 0.5)
        index = int(label)
        return classes[index] if 0 <= index < len(classes) else ""

    def __call__(self, batch: dict, prediction: torch.Tensor, output: torch.Tensor) -> None:
        """Record one evaluated batch."""
        probabilities = self.task.probabilities(output).cpu().numpy()
        labels = batch["label"].cpu().numpy()
        prediction = prediction.cpu().numpy()
        empty = torch.isnan(batch["image"]).flatten(1).all(dim=1).tolist()  # (B,)
        for j, index in enumerate(batch["index"].tolist()):
            true, predicted = self._names(labels[j]), self._names(prediction[j])
            scores = [float(p) for p in probabilities[j]]
            if empty[j]:  # no valid pixel: not classified, not scored (the dataset's rule)
                predicted, scores = "", []
            self.rows.append((index, self.dataset.sample_name(index), true, predicted, scores))
            kept = self.wrong if true != predicted else self.right
            if not empty[j] and len(kept) < self.num_panels:
                image = batch["image"][j].numpy()[self.rgb_index] * self.std + self.mean
                kept.append((image, true, predicted))

    def panels(self) -> list[tuple[np.ndarray, str, str]]:
        """The samples of the picture: misclassified ones first, then correct ones, at most
        ``num_panels``, each as (colour composite, true, predicted) under one common stretch
        (:func:`stretch_limits`), so uniform samples of different values look different."""
        chosen = (self.wrong + self.right)[: self.num_panels]
        limits = stretch_limits([image for image, _, _ in chosen])
        return [(rgb_composite(image, limits), true, predicted)
                for image, true, predicted in chosen]  # fmt: skip

    def finish(self, out_dir: Path) -> None:
        """Gather every rank's rows (rank 0 writes): ``predictions.csv`` in sample order, and
        the picture."""
        rows = self.rows
        info = self.info
        if info is not None and getattr(info, "distributed", False):
            import torch.distributed as dist

            gathered: list = [None] * info.world_size
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not self.is_main:
            return
        out_dir = Path(out_dir)
        header = ["sample", "label", "prediction", *(f"p_{c}" for c in self.dataset.classes)]
        lines = [",".join(header)]
        for _, name, true, predicted, probabilities in sorted(rows):
            cells = [name, true, predicted, *(f"{p:.6f}" for p in probabilities)]
            cells += [""] * (len(header) - len(cells))
            lines.append(",".join(f'"{c}"' if "," in c else c for c in cells))
        empty = [r[1] for r in sorted(rows) if not r[4]]
        if empty:
            log.warning(
                "%d of %d test images have no valid pixel (e.g. %s): not classified and not "
                "scored (out of the metrics' samples; empty label and prediction in "
                "predictions.csv)", len(empty), len(rows), empty[0],
            )  # fmt: skip
        with atomic_path(out_dir / "predictions.csv") as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        panels = self.panels()
        if panels:
            title = " / ".join(self.dataset.spec.display_bands)
            save_label_panels(panels, out_dir / "test_predictions.png",
                              f"{title} (one stretch for all); misclassified samples first")  # fmt: skip


def save_label_panels(panels: list[tuple[np.ndarray, str, str]], path: Path, title: str,
                      scale: int = 3) -> None:  # fmt: skip
    """One PNG: a row per sample of its colour composite, its true and its predicted labels
    (green when they agree, red when not)."""
    side = max(max(p[0].shape[:2]) for p in panels) * scale
    side = max(side, 96)
    text_w, gap, header = 360, 4, 30
    canvas = Image.new("RGB", (side + text_w + 3 * gap, header + len(panels) * (side + gap)),
                       "white")  # fmt: skip
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 2), title, fill="black")
    draw.text((side + 2 * gap, 16), "true / predicted", fill="black")
    for r, (rgb, true, predicted) in enumerate(panels):
        top = header + r * (side + gap)
        tile = Image.fromarray(rgb).resize((side, side), Image.NEAREST)
        canvas.paste(tile, (gap, top))
        colour = (20, 130, 20) if true == predicted else (200, 30, 30)
        draw.text((side + 2 * gap, top + 4), f"true: {true or '-'}", fill="black")
        draw.text((side + 2 * gap, top + 22), f"predicted: {predicted or '-'}", fill=colour)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def confusion_cells(matrix) -> tuple[np.ndarray, np.ndarray]:
    """The two panels of :func:`save_confusion_png`: the counts ``[true, predicted]`` and the
    row-normalised shares (each row divided by its total: the recall of the row's class on the
    diagonal; a row without samples stays 0)."""
    counts = np.asarray(matrix, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    return counts, shares


def compact(count: int) -> str:
    """A count in at most five characters: 987, 12.3k, 4.56M (pixel counts fit a cell)."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= limit:
            value = count / limit
            return f"{value:.3g}{suffix}" if value < 100 else f"{value:.0f}{suffix}"
    return str(int(count))


def save_confusion_png(matrix, class_names: list[str], path: Path, cell: int = 36) -> None:
    """Draw a confusion matrix ``[true, predicted]`` as one PNG: the counts and the
    row-normalised shares side by side (:func:`confusion_cells`), each cell shaded by its share
    of the row, the class names along both axes (rows: ground truth, columns: prediction)."""
    counts, shares = confusion_cells(matrix)
    k = len(class_names)
    names = [str(c)[:20] for c in class_names]
    label_w = max(60, 7 * max(len(n) for n in names) + 10)
    gap, top = 16, 18 + label_w
    panel = max(k * cell, 130)
    canvas = Image.new("RGB", (label_w + 2 * panel + 3 * gap, top + k * cell + gap + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (title, values) in enumerate((("counts", counts), ("% of each true class", shares))):
        x0 = label_w + gap + p * (panel + gap)
        draw.text((x0, 2), title, fill="black")
        for j, name in enumerate(names):  # column names, written upwards
            text = Image.new("RGB", (label_w - 6, 12), "white")
            ImageDraw.Draw(text).text((0, 0), name, fill="black")
            canvas.paste(text.rotate(90, expand=True), (x0 + j * cell + cell // 2 - 6, 16))
        for i in range(k):
            for j in range(k):
                shade = int(255 - 200 * shares[i, j])
                box = [x0 + j * cell, top + i * cell, x0 + (j + 1) * cell - 1,
                       top + (i + 1) * cell - 1]  # fmt: skip
                draw.rectangle(box, fill=(shade, shade, 255), outline=(200, 200, 200))
                text = compact(values[i, j]) if p == 0 else f"{100 * values[i, j]:.0f}%"
                colour = "white" if shares[i, j] > 0.6 else "black"
                draw.text((box[0] + 3, box[1] + cell // 2 - 6), text, fill=colour)
    for i, name in enumerate(names):  # row names
        draw.text((4, top + i * cell + cell // 2 - 6), name, fill="black")
    draw.text((4, top + k * cell + gap // 2), "rows: true class; columns: predicted class",
              fill="black")  # fmt: skip
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
