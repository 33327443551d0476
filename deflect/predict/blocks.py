"""The block loop of scene prediction: a scene's per-pixel output made block by block over the
global tile grid of evaluation's sliding window (:mod:`deflect.tiling`), in memory bounded by
the block, and :class:`SceneSource`, the open scene a task's scene writer reads and runs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from tqdm import tqdm

from deflect.predict.reading import SceneInput, read_normalised, read_valid, scene_profile
from deflect.predict.run import Predictor
from deflect.tiling import TileGrid, blocks, intersecting, round_block

#: Default side of the output blocks, in pixels (rounded to a multiple of the stride).
DEFAULT_BLOCK = 1024


@torch.no_grad()
def predict_block(
    predictor: Predictor,
    src: rasterio.DatasetReader,
    indexes: list[int],
    grid: TileGrid,
    box: tuple[int, int, int, int],
    batch_size: int,
    warned: set[str] | None = None,
    nodata: Sequence[float] = (),
    factors: np.ndarray | None = None,
) -> tuple[torch.Tensor, np.ndarray, int]:
    """Averaged logits of one output block from the global tiles that intersect it.

    Args:
        predictor: the model and its window.
        src: the open scene.
        indexes: the scene's band numbers in the model's order (:func:`select_bands`).
        grid: the scene's tile grid.
        box: the block ``(y0, y1, x0, x1)``.
        batch_size: tiles per forward pass.
        warned: metadata keys already warned about.
        nodata: no-data values besides the training one (the scene's own declared value).

    Returns:
        Logits ``(K, y1 - y0, x1 - x0)`` float32 on the CPU (``K``: the model's output
        channels, classes or targets), the block's mask of pixels where every band is invalid
        ``(y1 - y0, x1 - x0)``, and the number of tiles run.
    """
    y0, y1, x0, x1 = box
    win = predictor.window
    tops = intersecting(grid.starts_y, y0, y1, win)
    lefts = intersecting(grid.starts_x, x0, x1, win)
    # The union of those tiles; beyond the scene (only for scenes smaller than the window) NaN.
    ey0, ey1, ex0, ex1 = tops[0], tops[-1] + win, lefts[0], lefts[-1] + win
    ry1, rx1 = min(ey1, grid.height), min(ex1, grid.width)
    read = read_normalised(
        src, indexes, Window(ex0, ey0, rx1 - ex0, ry1 - ey0), predictor.spec, nodata, factors,
        normalise=not predictor.raw_input,
    )  # fmt: skip
    image = torch.from_numpy(read)
    if ry1 < ey1 or rx1 < ex1:
        image = torch.nn.functional.pad(image, (0, ex1 - rx1, 0, ey1 - ry1), value=torch.nan)
    invalid = np.isnan(read[:, y0 - ey0 : y1 - ey0, x0 - ex0 : x1 - ex0]).all(axis=0)
    image = image.to(predictor.device)

    logits = None  # (K, h, w): K is what the model gives (classes, targets), read from it
    tiles = [(top, left) for top in tops for left in lefts]  # the order of sliding_window_logits
    warned = set() if warned is None else warned
    for first in range(0, len(tiles), batch_size):
        chunk = tiles[first : first + batch_size]
        batch = torch.stack(
            [image[:, t - ey0 : t - ey0 + win, le - ex0 : le - ex0 + win] for t, le in chunk]
        )
        out = predictor.forward(batch, warned)
        if logits is None:
            logits = torch.zeros((out.shape[1], y1 - y0, x1 - x0), dtype=torch.float32,
                                 device=predictor.device)  # fmt: skip
        for (top, left), tile in zip(chunk, out):
            # The part of the tile inside the block (and inside the scene).
            a0, a1 = max(top, y0), min(top + win, y1)
            b0, b1 = max(left, x0), min(left + win, x1)
            logits[:, a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] += tile[
                :, a0 - top : a1 - top, b0 - left : b1 - left
            ]
    counts = np.outer(grid.counts_y[y0:y1], grid.counts_x[x0:x1])
    logits /= torch.from_numpy(counts).to(predictor.device)
    return logits.cpu(), invalid, len(tiles)


class SceneSource:
    """An open scene as a task's scene writer sees it (``Task.scene_writer``): what it can read,
    run and write, without knowing how the scene was opened.

    Args:
        predictor: the model and its window, stride and tile.
        path: the scene's file.
        scene: the open file and how its bands become the model's.
        batch_size: tiles per forward pass.
        block: side of the output blocks of :meth:`dense_blocks` (rounded to the stride there).
    """

    def __init__(self, predictor: Predictor, path: Path, scene: SceneInput, batch_size: int,
                 block: int) -> None:  # fmt: skip
        self.predictor, self.path, self.input = predictor, path, scene
        self.src = scene.src
        self.batch_size, self.block = batch_size, block
        #: Tiles run through the model by :meth:`dense_blocks` (straddling tiles once per block).
        self.forwards = 0
        #: Output blocks of :meth:`dense_blocks`.
        self.block_count = 0

    def read(self, window: Window | None) -> np.ndarray:
        """The model's bands of ``window`` in the trained units, NaN where invalid
        (:func:`~deflect.predict.reading.read_valid`)."""
        scene = self.input
        return read_valid(self.src, scene.indexes, window, self.predictor.spec, scene.nodata,
                          scene.factors)  # fmt: skip

    def profile(self, count: int, dtype: str, nodata: float) -> dict:
        """An output GeoTIFF's profile over the scene (size, CRS, transform; tiled, compressed)."""
        return scene_profile(self.src, count, dtype, nodata)

    def dense_blocks(self, progress: bool) -> Iterator[tuple[Window, torch.Tensor, np.ndarray]]:
        """The scene's averaged output, block by block: ``(window, logits (K, h, w) on the CPU,
        mask of pixels where every band is invalid (h, w))``, equal to evaluation's sliding
        window over the whole scene.

        Raises:
            ValueError: a block side below 1 (raised here, before anything is written).
        """
        predictor = self.predictor
        self.block = round_block(self.block, predictor.stride)
        grid = TileGrid(self.src.height, self.src.width, predictor.window, predictor.stride)
        boxes = list(blocks(self.src.height, self.src.width, self.block))
        self.block_count = len(boxes)
        return self._run(grid, boxes, progress)

    def _run(self, grid: TileGrid, boxes: list, progress: bool) -> Iterator:
        scene = self.input
        warned: set[str] = set()
        bar = tqdm(boxes, desc=self.path.name, disable=not progress, leave=False,
                   dynamic_ncols=True)  # fmt: skip
        for box in bar:
            logits, invalid, run = predict_block(
                self.predictor, self.src, scene.indexes, grid, box, self.batch_size, warned,
                scene.nodata, scene.factors,
            )  # fmt: skip
            self.forwards += run
            y0, y1, x0, x1 = box
            yield Window(x0, y0, x1 - x0, y1 - y0), logits, invalid
