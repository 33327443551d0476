"""Pictures a run leaves to look at, for any task: colour composites of the input bands, class
maps in a fixed palette, panels side by side, and a confusion matrix. Engine-neutral: the tasks'
writers and ``scripts/predict.py`` draw with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from deflect.io import atomic_path

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
